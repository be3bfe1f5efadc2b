//! The gateway's Prometheus metrics. Labels stay bounded: models the pool knows (else
//! "(unknown)"), worker addresses (series removed when a worker leaves), status codes.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use infermesh_core::metrics::LATENCY_BUCKETS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// A split's draw: which version it went to and how (routed, fallback, unavailable).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SplitLabels {
    pub model: String,
    pub version: String,
    pub result: String,
}

/// A hedge's outcome: won (its answer was used) or lost (the first attempt's was).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HedgeLabels {
    pub model: String,
    pub result: String,
}

/// A shadow copy's result: agree, disagree, error or dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub model: String,
    pub target: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowTargetLabels {
    pub model: String,
    pub target: String,
}

/// A guard's rollback of a version, and why (error_rate or agreement).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RollbackLabels {
    pub model: String,
    pub version: String,
    pub why: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: String,
}

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A shadow comparison's max absolute error: 1e-9 to 1e3, a bucket per decade.
pub fn abs_error() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-9, 10.0, 13,
    ))
}

/// A shadow comparison's lowest cosine similarity of a float output, finest near 1.
pub fn cosine() -> Histogram {
    Histogram::new([0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999, 1.0])
}

#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub worker_attempts: Family<WorkerLabels, Counter>,
    pub worker_outstanding: Family<WorkerLabels, Gauge>,
    pub worker_load: Family<WorkerLabels, Gauge>,
    pub worker_ready: Family<WorkerLabels, Gauge>,
    pub ejections: Family<WorkerLabels, Counter>,
    pub worker_streams: Family<WorkerLabels, Gauge>,
    pub retries: Family<CodeLabels, Counter>,
    pub retry_budget_exhausted: Counter,
    pub poison: Counter,
    pub discovery_changes: Family<ChangeLabels, Counter>,
    pub dns_failures: Counter,
    pub open_streams: Gauge,
    /// Sequences (Triton's sequence_id) this gateway holds a worker for.
    pub sequences_open: Gauge,
    /// Sequence requests answered `sequence-lost`.
    pub sequences_lost: Counter,
    pub split: Family<SplitLabels, Counter>,
    pub hedges: Family<HedgeLabels, Counter>,
    pub shadow: Family<ShadowLabels, Counter>,
    pub shadow_abs_error: Family<ShadowTargetLabels, Histogram, fn() -> Histogram>,
    pub shadow_cosine: Family<ShadowTargetLabels, Histogram, fn() -> Histogram>,
    pub rollbacks: Family<RollbackLabels, Counter>,
    pub rollbacks_withheld: Family<RollbackLabels, Counter>,
    /// Each model's request series, resolved once (see [`GatewayMetrics::model`]).
    models: Arc<RwLock<HashMap<String, Arc<ModelRecords>>>>,
}

impl Default for GatewayMetrics {
    /// Unregistered metrics (tests, or a gateway without a registry).
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            worker_attempts: Family::default(),
            worker_outstanding: Family::default(),
            worker_load: Family::default(),
            worker_ready: Family::default(),
            ejections: Family::default(),
            worker_streams: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Counter::default(),
            poison: Counter::default(),
            discovery_changes: Family::default(),
            dns_failures: Counter::default(),
            open_streams: Gauge::default(),
            sequences_open: Gauge::default(),
            sequences_lost: Counter::default(),
            split: Family::default(),
            hedges: Family::default(),
            shadow: Family::default(),
            shadow_abs_error: Family::new_with_constructor(abs_error),
            shadow_cosine: Family::new_with_constructor(cosine),
            rollbacks: Family::default(),
            rollbacks_withheld: Family::default(),
            models: Default::default(),
        }
    }
}

impl GatewayMetrics {
    /// One finished request (or, with CANCELLED, one whose caller went away).
    /// The request series of `model` (a label already bounded by the caller), looked up
    /// by `&str`: a request's record allocates nothing once its model has been seen.
    pub fn model(&self, model: &str) -> Arc<ModelRecords> {
        if let Some(found) = self.models.read().expect("metrics lock").get(model) {
            return found.clone();
        }
        let made = Arc::new(ModelRecords {
            ok: self
                .requests
                .get_or_create(&RequestLabels {
                    model: model.into(),
                    code: format!("{:?}", tonic::Code::Ok),
                })
                .clone(),
            duration: self
                .request_duration
                .get_or_create(&ModelLabels {
                    model: model.into(),
                })
                .clone(),
            model: model.into(),
            requests: self.requests.clone(),
        });
        let mut models = self.models.write().expect("metrics lock");
        models.entry(model.into()).or_insert(made).clone()
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("infermesh_gateway");
        r.register(
            "requests",
            "Inference requests (stream messages included) by model and final gRPC status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Arrival to answer at the gateway, retries included",
            m.request_duration.clone(),
        );
        r.register(
            "worker_attempts",
            "Attempts sent to each worker (retries and stream messages included)",
            m.worker_attempts.clone(),
        );
        r.register(
            "worker_outstanding",
            "Requests in flight to each worker",
            m.worker_outstanding.clone(),
        );
        r.register(
            "worker_load",
            "Each worker's load estimate (PeakEWMA latency in µs × (outstanding + 1)), as of its last poll",
            m.worker_load.clone(),
        );
        r.register(
            "worker_ready",
            "1 while a worker is in rotation",
            m.worker_ready.clone(),
        );
        r.register(
            "ejections",
            "Times a worker was ejected after transport failures",
            m.ejections.clone(),
        );
        r.register(
            "worker_streams",
            "ModelStreamInfer streams open to each worker that requests travel on",
            m.worker_streams.clone(),
        );
        r.register(
            "retries",
            "Attempts retried on another worker, by the status that caused them",
            m.retries.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries refused because the retry budget was empty",
            m.retry_budget_exhausted.clone(),
        );
        r.register(
            "poison",
            "Requests that broke 2 workers, whose fingerprint is then refused for a while",
            m.poison.clone(),
        );
        r.register(
            "discovery_changes",
            "Workers inserted into or removed from the pool",
            m.discovery_changes.clone(),
        );
        r.register(
            "dns_failures",
            "DNS lookups that failed or came back empty (the last good set was kept)",
            m.dns_failures.clone(),
        );
        r.register(
            "open_streams",
            "ModelStreamInfer streams open now",
            m.open_streams.clone(),
        );
        r.register(
            "sequences_open",
            "Sequences (Triton's sequence_id) this gateway keeps on a worker",
            m.sequences_open.clone(),
        );
        r.register(
            "sequences_lost",
            "Sequence requests answered sequence-lost: the sequence's worker was gone",
            m.sequences_lost.clone(),
        );
        r.register(
            "split_requests",
            "Requests that named no version, by the version the routing file's split sent them to and result (routed; fallback: the drawn version had no ready worker and this one took its part; unavailable: failed with version-unavailable)",
            m.split.clone(),
        );
        r.register(
            "hedges",
            "Hedged copies sent by the routing file's hedge rule, by result (won: its answer was used; lost: the first attempt answered first and the copy was cancelled)",
            m.hedges.clone(),
        );
        r.register(
            "shadow",
            "Shadow copies sent by the routing file's shadow rule, by target and result (agree: every output within atol + rtol·|primary|; disagree; error: not comparable, or the copy failed; dropped: not sent, the shadow limits or the target's workers being busy)",
            m.shadow.clone(),
        );
        r.register(
            "shadow_max_abs_error",
            "Each shadow comparison's largest absolute difference from the primary's answer over its float outputs",
            m.shadow_abs_error.clone(),
        );
        r.register(
            "shadow_cosine_similarity",
            "Each shadow comparison's lowest cosine similarity with the primary's answer over its float outputs",
            m.shadow_cosine.clone(),
        );
        r.register(
            "rollbacks",
            "Versions the routing file's guard took out of the split, by why (error_rate, agreement)",
            m.rollbacks.clone(),
        );
        r.register(
            "rollbacks_withheld",
            "Times a guard would have taken a version out of the split but kept it, as the last version with weight",
            m.rollbacks_withheld.clone(),
        );
        m
    }

    pub fn worker(&self, addr: &str) -> WorkerMetrics {
        let l = WorkerLabels {
            worker: addr.to_string(),
        };
        WorkerMetrics {
            attempts: self.worker_attempts.get_or_create(&l).clone(),
            outstanding: self.worker_outstanding.get_or_create(&l).clone(),
            load: self.worker_load.get_or_create(&l).clone(),
            ready: self.worker_ready.get_or_create(&l).clone(),
            ejections: self.ejections.get_or_create(&l).clone(),
            streams: self.worker_streams.get_or_create(&l).clone(),
        }
    }

    /// Drops a departed worker's series.
    pub fn forget_worker(&self, addr: &str) {
        let l = WorkerLabels {
            worker: addr.to_string(),
        };
        self.worker_attempts.remove(&l);
        self.worker_outstanding.remove(&l);
        self.worker_load.remove(&l);
        self.worker_ready.remove(&l);
        self.ejections.remove(&l);
        self.worker_streams.remove(&l);
    }
}

/// One worker's handles, held by its endpoint.
#[derive(Clone, Debug, Default)]
pub struct WorkerMetrics {
    pub attempts: Counter,
    pub outstanding: Gauge,
    pub load: Gauge,
    pub ready: Gauge,
    pub ejections: Counter,
    pub streams: Gauge,
}

/// Counts one open thing (a client's stream, a stream to a worker) on a gauge until
/// dropped.
pub struct OpenGauge(Gauge);

impl OpenGauge {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One model's request series: its OK counter and its duration histogram held, other
/// codes through the family (failures are rare, and each code is its own series).
#[derive(Debug)]
pub struct ModelRecords {
    ok: Counter,
    duration: Histogram,
    model: String,
    requests: Family<RequestLabels, Counter>,
}

impl ModelRecords {
    pub fn record(&self, code: tonic::Code, took: std::time::Duration) {
        match code {
            tonic::Code::Ok => self.ok.inc(),
            code => self
                .requests
                .get_or_create(&RequestLabels {
                    model: self.model.clone(),
                    code: format!("{code:?}"),
                })
                .inc(),
        };
        self.duration.observe(took.as_secs_f64());
    }
}
