//! Placement's metrics: loads and their duration, evictions and the idle time of what was
//! evicted, refused loads by reason, collapsed duplicate loads, capacity, use, and the
//! measured size of each model version.

use infermesh_core::metrics::{ReasonLabels, ResultLabels};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::metrics::ModelLabels;

fn seconds() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
    ])
}

#[derive(Clone, Debug)]
pub struct PlacementMetrics {
    pub loads: Family<ResultLabels, Counter>,
    pub load_duration: Histogram,
    pub evictions: Counter,
    pub eviction_idle: Histogram,
    pub eviction_age: Histogram,
    pub refusals: Family<ReasonLabels, Counter>,
    pub collapses: Counter,
    pub capacity_bytes: Gauge,
    pub used_bytes: Gauge,
    pub model_bytes: Family<ModelLabels, Gauge>,
    pub model_device_bytes: Family<ModelLabels, Gauge>,
}

impl Default for PlacementMetrics {
    fn default() -> Self {
        Self {
            loads: Family::default(),
            load_duration: seconds(),
            evictions: Counter::default(),
            eviction_idle: seconds(),
            eviction_age: seconds(),
            refusals: Family::default(),
            collapses: Counter::default(),
            capacity_bytes: Gauge::default(),
            used_bytes: Gauge::default(),
            model_bytes: Family::default(),
            model_device_bytes: Family::default(),
        }
    }
}

impl PlacementMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("infermesh_model");
        r.register(
            "loads",
            "Model version loads by result (ok, failed)",
            m.loads.clone(),
        );
        r.register(
            "load_duration_seconds",
            "Time each model version took to load",
            m.load_duration.clone(),
        );
        r.register(
            "evictions",
            "Models unloaded to make room for another (placement mode)",
            m.evictions.clone(),
        );
        r.register(
            "eviction_idle_seconds",
            "How long an evicted model had gone unused",
            m.eviction_idle.clone(),
        );
        r.register(
            "eviction_age_seconds",
            "How long an evicted model had been loaded",
            m.eviction_age.clone(),
        );
        r.register(
            "load_refusals",
            "Loads refused for want of room, by reason (over-capacity, churn-guard)",
            m.refusals.clone(),
        );
        r.register(
            "load_collapses",
            "Loads asked while the same model was loading: they waited for that one",
            m.collapses.clone(),
        );
        r.register(
            "memory_capacity_bytes",
            "The memory models may take (--model-memory-bytes)",
            m.capacity_bytes.clone(),
        );
        r.register(
            "memory_used_bytes",
            "What the loaded models took, as measured (estimated until measured)",
            m.used_bytes.clone(),
        );
        r.register(
            "memory_bytes",
            "What loading each model version took (the resident set's growth)",
            m.model_bytes.clone(),
        );
        r.register(
            "device_memory_bytes",
            "On CUDA: the GPU memory each model version's load took (NVML, summed over GPUs)",
            m.model_device_bytes.clone(),
        );
        m
    }

    pub fn device_bytes(&self, model: &str, version: i64) -> Gauge {
        self.model_device_bytes
            .get_or_create(&ModelLabels {
                model: model.into(),
                version: version.to_string(),
            })
            .clone()
    }

    pub fn model_bytes(&self, model: &str, version: i64) -> Gauge {
        self.model_bytes
            .get_or_create(&ModelLabels {
                model: model.into(),
                version: version.to_string(),
            })
            .clone()
    }

    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn loaded(&self, ok: bool, took: std::time::Duration) {
        let result = if ok { "ok" } else { "failed" };
        self.loads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.load_duration.observe(took.as_secs_f64());
    }
}
