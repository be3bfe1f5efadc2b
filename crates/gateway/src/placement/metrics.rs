//! The gateway's placement metrics (`infermesh_gateway_placement_*`).

pub use infermesh_core::metrics::{ReasonLabels, ResultLabels};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use crate::metrics::ModelLabels;
use infermesh_core::Reason;

fn cold_buckets() -> Histogram {
    // From a small model's tens of milliseconds to a large one's minutes.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 15,
    ))
}

#[derive(Clone, Debug)]
pub struct PlacementMetrics {
    /// Requests for a placed model by whether a ready copy was there (hit) or it had to
    /// be loaded first (cold).
    pub requests: Family<ResultLabels, Counter>,
    pub cold_wait: Histogram,
    /// Loads the gateway asked workers for, by result.
    pub loads: Family<ResultLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    pub queue: Family<ModelLabels, Gauge>,
    pub copies: Family<ModelLabels, Gauge>,
    /// Copies the keeper asked for beyond requests' own loads, by why (min, load).
    pub copies_added: Family<ResultLabels, Counter>,
}

impl Default for PlacementMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            cold_wait: cold_buckets(),
            loads: Family::default(),
            refusals: Family::default(),
            queue: Family::default(),
            copies: Family::default(),
            copies_added: Family::default(),
        }
    }
}

impl PlacementMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("infermesh_gateway_placement");
        r.register(
            "requests",
            "Requests (stream messages included) for models on placement-mode workers, by whether a ready copy was there (hit) or the model had to be loaded first (cold)",
            m.requests.clone(),
        );
        r.register(
            "cold_wait_seconds",
            "How long a request waited for its model to be loaded (cold start)",
            m.cold_wait.clone(),
        );
        r.register(
            "loads",
            "Model loads the gateway asked workers for, by result (loaded, refused, failed)",
            m.loads.clone(),
        );
        r.register(
            "load_refusals",
            "Loads a worker refused, by reason (over-capacity, churn-guard)",
            m.refusals.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting at this gateway for their model to be loaded, per model",
            m.queue.clone(),
        );
        r.register(
            "copies",
            "Ready copies of each model over the workers (workers holding a ready version)",
            m.copies.clone(),
        );
        r.register(
            "copies_added",
            "Copies the gateway asked for ahead of requests, by why (min: the routing file's copies.min; load: the copies were saturated)",
            m.copies_added.clone(),
        );
        // Every series but the per-model ones exists from start, at 0, so dashboards and
        // rates see it before the first cold start.
        for result in ["hit", "cold"] {
            Self::touch(&m.requests, result);
        }
        for result in ["loaded", "refused", "failed"] {
            Self::touch(&m.loads, result);
        }
        for result in ["min", "load"] {
            Self::touch(&m.copies_added, result);
        }
        for reason in [Reason::OverCapacity, Reason::ChurnGuard] {
            let _ = m.refusals.get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            });
        }
        m
    }

    /// A load a worker refused for `reason`.
    pub fn refused(&self, reason: Reason) {
        Self::count(&self.loads, "refused");
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    fn touch(family: &Family<ResultLabels, Counter>, result: &str) {
        let _ = family.get_or_create(&ResultLabels {
            result: result.into(),
        });
    }

    pub fn count(family: &Family<ResultLabels, Counter>, result: &str) {
        family
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }
}
