//! ModelStatistics at the gateway: the sum over workers of what each last reported. A
//! worker that leaves keeps its last counts, so the sums never go down (perf_analyzer
//! compares windows).

use std::{collections::BTreeMap, sync::Mutex};

use infermesh_proto as pb;

#[derive(Default)]
pub struct StatsCache {
    /// Last full report of each worker (all models), by address.
    last: Mutex<BTreeMap<String, Vec<pb::ModelStatistics>>>,
}

fn add(a: &mut Option<pb::StatisticDuration>, b: &Option<pb::StatisticDuration>) {
    if let Some(b) = b {
        let a = a.get_or_insert_with(Default::default);
        a.count += b.count;
        a.ns += b.ns;
    }
}

impl StatsCache {
    pub fn update(&self, worker: &str, stats: Vec<pb::ModelStatistics>) {
        self.last
            .lock()
            .expect("stats lock")
            .insert(worker.to_string(), stats);
    }

    /// Sums per (model, version), filtered like Triton's request ("" = all).
    pub fn sum(&self, name: &str, version: &str) -> Vec<pb::ModelStatistics> {
        let last = self.last.lock().expect("stats lock");
        let mut out: BTreeMap<(String, String), pb::ModelStatistics> = BTreeMap::new();
        for s in last.values().flatten() {
            if (!name.is_empty() && s.name != name) || (!version.is_empty() && s.version != version)
            {
                continue;
            }
            let t = out
                .entry((s.name.clone(), s.version.clone()))
                .or_insert_with(|| pb::ModelStatistics {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    ..Default::default()
                });
            t.last_inference = t.last_inference.max(s.last_inference);
            t.inference_count += s.inference_count;
            t.execution_count += s.execution_count;
            if let Some(b) = &s.inference_stats {
                let a = t.inference_stats.get_or_insert_with(Default::default);
                add(&mut a.success, &b.success);
                add(&mut a.fail, &b.fail);
                add(&mut a.queue, &b.queue);
                add(&mut a.compute_input, &b.compute_input);
                add(&mut a.compute_infer, &b.compute_infer);
                add(&mut a.compute_output, &b.compute_output);
                add(&mut a.cache_hit, &b.cache_hit);
                add(&mut a.cache_miss, &b.cache_miss);
            }
            for b in &s.batch_stats {
                match t
                    .batch_stats
                    .iter_mut()
                    .find(|x| x.batch_size == b.batch_size)
                {
                    Some(x) => {
                        add(&mut x.compute_input, &b.compute_input);
                        add(&mut x.compute_infer, &b.compute_infer);
                        add(&mut x.compute_output, &b.compute_output);
                    }
                    None => t.batch_stats.push(*b),
                }
            }
        }
        let mut v: Vec<_> = out.into_values().collect();
        v.iter_mut()
            .for_each(|s| s.batch_stats.sort_by_key(|b| b.batch_size));
        v
    }
}
