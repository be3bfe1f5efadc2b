//! Per-model-version statistics with Triton's meaning: inference_count counts samples
//! (rows), execution_count engine runs, success/fail/queue/compute_* count requests (each
//! request of a batch is charged the batch's compute time), batch_stats one entry per
//! executed batch size. Sums only ever grow.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use infermesh_proto as pb;

use crate::metrics::ModelMetrics;

#[derive(Default, Clone, Copy)]
struct Dur {
    count: u64,
    ns: u64,
}

impl Dur {
    fn add(&mut self, n: u64, d: Duration) {
        self.count += n;
        self.ns += d.as_nanos() as u64 * n;
    }

    fn pb(self) -> Option<pb::StatisticDuration> {
        Some(pb::StatisticDuration {
            count: self.count,
            ns: self.ns,
        })
    }
}

#[derive(Default)]
struct Inner {
    last_inference_ms: u64,
    inference_count: u64,
    execution_count: u64,
    success: Dur,
    fail: Dur,
    queue: Dur,
    compute_input: Dur,
    compute_infer: Dur,
    compute_output: Dur,
    cache_hit: Dur,
    cache_miss: Dur,
    batches: BTreeMap<u64, [Dur; 3]>,
}

/// Time spent in each phase of one executed batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

/// Triton's statistics for one model version, plus its Prometheus handles.
#[derive(Default)]
pub struct Stats {
    inner: Mutex<Inner>,
    pub metrics: ModelMetrics,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stats")
    }
}

impl Stats {
    pub fn new(metrics: ModelMetrics) -> Self {
        Self {
            inner: Mutex::default(),
            metrics,
        }
    }

    /// One engine run of `rows` samples from `requests` requests that all succeeded; `queue`
    /// and `total` hold each request's queue and end-to-end time.
    pub fn batch_ok(&self, rows: u64, times: BatchTimes, per_request: &[(Duration, Duration)]) {
        self.metrics.batch_size.observe(rows as f64);
        self.metrics
            .compute_duration
            .observe((times.input + times.infer + times.output).as_secs_f64());
        per_request
            .iter()
            .for_each(|(q, _)| self.metrics.queue_duration.observe(q.as_secs_f64()));
        let mut s = self.inner.lock().expect("stats lock");
        let n = per_request.len() as u64;
        s.execution_count += 1;
        s.inference_count += rows;
        s.compute_input.add(n, times.input);
        s.compute_infer.add(n, times.infer);
        s.compute_output.add(n, times.output);
        for &(queue, total) in per_request {
            s.queue.add(1, queue);
            s.success.add(1, total);
        }
        let b = s.batches.entry(rows).or_default();
        b[0].add(1, times.input);
        b[1].add(1, times.infer);
        b[2].add(1, times.output);
        s.last_inference_ms = now_ms();
    }

    /// A request answered from the response cache in `took`: a success that ran nothing
    /// (`inference_count` and `execution_count` count engine work only, as Triton's do).
    pub fn cache_hit(&self, took: Duration) {
        let mut s = self.inner.lock().expect("stats lock");
        s.cache_hit.add(1, took);
        s.success.add(1, took);
        s.last_inference_ms = now_ms();
    }

    /// A cacheable request that ran the engine: `lookup_and_insert` is the time the
    /// cache took (looking up, then storing the answer).
    pub fn cache_miss(&self, lookup_and_insert: Duration) {
        self.inner
            .lock()
            .expect("stats lock")
            .cache_miss
            .add(1, lookup_and_insert);
    }

    pub fn failed(&self, total: Duration) {
        self.inner.lock().expect("stats lock").fail.add(1, total);
    }

    pub fn skipped_cancelled(&self) {
        self.metrics.skipped_cancelled.inc();
    }

    pub fn skipped_expired(&self, total: Duration) {
        self.metrics.skipped_expired.inc();
        self.inner.lock().expect("stats lock").fail.add(1, total);
    }

    pub fn to_pb(&self, name: &str, version: i64) -> pb::ModelStatistics {
        let s = self.inner.lock().expect("stats lock");
        pb::ModelStatistics {
            name: name.into(),
            version: version.to_string(),
            last_inference: s.last_inference_ms,
            inference_count: s.inference_count,
            execution_count: s.execution_count,
            inference_stats: Some(pb::InferStatistics {
                success: s.success.pb(),
                fail: s.fail.pb(),
                queue: s.queue.pb(),
                compute_input: s.compute_input.pb(),
                compute_infer: s.compute_infer.pb(),
                compute_output: s.compute_output.pb(),
                cache_hit: s.cache_hit.pb(),
                cache_miss: s.cache_miss.pb(),
            }),
            batch_stats: s
                .batches
                .iter()
                .map(|(&size, [i, c, o])| pb::InferBatchStatistics {
                    batch_size: size,
                    compute_input: i.pb(),
                    compute_infer: c.pb(),
                    compute_output: o.pb(),
                })
                .collect(),
            memory_usage: vec![],
            response_stats: Default::default(),
        }
    }
}

/// Unix time in milliseconds.
pub use infermesh_core::unix_ms as now_ms;
