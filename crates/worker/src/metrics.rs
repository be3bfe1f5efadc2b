//! The worker's Prometheus metrics. Labels stay bounded: model, version, status code,
//! instance index, provider; never request ids.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use infermesh_core::metrics::LATENCY_BUCKETS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub version: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub model: String,
    pub version: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub model: String,
    pub version: String,
    pub instance: String,
    pub provider: String,
}

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn batch_sizes() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
}

#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub queue_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub compute_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub batch_size: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub instances_busy: Family<ModelLabels, Gauge>,
    pub skipped: Family<RequestLabels, Counter>,
    pub model_state: Family<StateLabels, Gauge>,
    pub instance_provider: Family<InstanceLabels, Gauge>,
    pub inflight_requests: Gauge,
    pub inflight_bytes: Gauge,
    pub repository_poll_failures: Counter,
    pub update_failures: Counter,
    pub warmup_runs: Family<ModelLabels, Counter>,
    pub cache: crate::cache::CacheMetrics,
    pub placement: crate::placement::PlacementMetrics,
    pub sequences: crate::sequence::SequenceMetrics,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            queue_duration: Family::new_with_constructor(latency),
            compute_duration: Family::new_with_constructor(latency),
            batch_size: Family::new_with_constructor(batch_sizes),
            queue_depth: Family::default(),
            instances_busy: Family::default(),
            skipped: Family::default(),
            model_state: Family::default(),
            instance_provider: Family::default(),
            inflight_requests: Gauge::default(),
            inflight_bytes: Gauge::default(),
            repository_poll_failures: Counter::default(),
            update_failures: Counter::default(),
            warmup_runs: Family::default(),
            cache: crate::cache::CacheMetrics::register(registry),
            placement: crate::placement::PlacementMetrics::register(registry),
            sequences: crate::sequence::SequenceMetrics::register(registry),
        };
        let r = registry.sub_registry_with_prefix("infermesh");
        r.register(
            "requests",
            "Inference requests by model, version and gRPC status code",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from arrival to response inside the worker",
            m.request_duration.clone(),
        );
        r.register(
            "queue_duration_seconds",
            "Time a request waited for an instance",
            m.queue_duration.clone(),
        );
        r.register(
            "compute_duration_seconds",
            "Engine time of each executed batch",
            m.compute_duration.clone(),
        );
        r.register(
            "batch_size",
            "Rows per executed batch",
            m.batch_size.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for an instance",
            m.queue_depth.clone(),
        );
        r.register(
            "instances_busy",
            "Instances executing a batch now",
            m.instances_busy.clone(),
        );
        r.register(
            "skipped_requests",
            "Requests dropped before the engine: code CANCELLED (caller gone) or DEADLINE_EXCEEDED",
            m.skipped.clone(),
        );
        r.register(
            "model_state",
            "1 for the state each model version is in (LOADING, READY, UNAVAILABLE)",
            m.model_state.clone(),
        );
        r.register(
            "instance_provider",
            "1 per instance, labelled with the execution provider it really runs on (CPU, CUDA:n)",
            m.instance_provider.clone(),
        );
        r.register(
            "inflight_requests",
            "Inference requests being handled",
            m.inflight_requests.clone(),
        );
        r.register(
            "inflight_bytes",
            "Request bytes held in memory (bounded by --max-inflight-bytes)",
            m.inflight_bytes.clone(),
        );
        r.register(
            "repository_poll_failures",
            "Rescans of the model repository that failed (poll mode); loaded models keep serving",
            m.repository_poll_failures.clone(),
        );
        r.register(
            "model_load_failures",
            "Model versions or configs that failed to load (at start or in an update); a failed update leaves the versions that were serving in service",
            m.update_failures.clone(),
        );
        r.register(
            "warmup_runs",
            "model_warmup samples run before a version turned READY (each instance, each count)",
            m.warmup_runs.clone(),
        );
        m
    }

    /// One finished request (or, with CANCELLED, one whose caller went away).
    pub fn record_request(
        &self,
        model: &str,
        version: &str,
        code: tonic::Code,
        took: std::time::Duration,
    ) {
        let labels = RequestLabels {
            model: model.into(),
            version: version.into(),
            code: format!("{code:?}"),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&ModelLabels {
                model: labels.model,
                version: labels.version,
            })
            .observe(took.as_secs_f64());
    }

    /// Handles for one model version, cloned into its scheduler and instances.
    pub fn model(&self, model: &str, version: i64) -> ModelMetrics {
        let l = ModelLabels {
            model: model.into(),
            version: version.to_string(),
        };
        let skipped = |code: &str| {
            self.skipped
                .get_or_create(&RequestLabels {
                    model: l.model.clone(),
                    version: l.version.clone(),
                    code: code.into(),
                })
                .clone()
        };
        ModelMetrics {
            queue_duration: self.queue_duration.get_or_create(&l).clone(),
            compute_duration: self.compute_duration.get_or_create(&l).clone(),
            batch_size: self.batch_size.get_or_create(&l).clone(),
            queue_depth: self.queue_depth.get_or_create(&l).clone(),
            instances_busy: self.instances_busy.get_or_create(&l).clone(),
            skipped_cancelled: skipped("CANCELLED"),
            skipped_expired: skipped("DEADLINE_EXCEEDED"),
            warmup_runs: self.warmup_runs.get_or_create(&l).clone(),
        }
    }

    /// Marks `state` as the one state of a model version.
    pub fn set_state(&self, model: &str, version: Option<i64>, state: &str) {
        let version = version.map(|v| v.to_string()).unwrap_or_default();
        for s in ["LOADING", "READY", "UNAVAILABLE"] {
            let l = StateLabels {
                model: model.into(),
                version: version.clone(),
                state: s.into(),
            };
            self.model_state.get_or_create(&l).set((s == state) as i64);
        }
    }
}

/// One model version's metric handles.
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
    pub instances_busy: Gauge,
    pub skipped_cancelled: Counter,
    pub skipped_expired: Counter,
    pub warmup_runs: Counter,
}

impl Default for ModelMetrics {
    /// Unregistered handles, for code paths (tests) without a registry.
    fn default() -> Self {
        Self {
            queue_duration: latency(),
            compute_duration: latency(),
            batch_size: batch_sizes(),
            queue_depth: Gauge::default(),
            instances_busy: Gauge::default(),
            skipped_cancelled: Counter::default(),
            skipped_expired: Counter::default(),
            warmup_runs: Counter::default(),
        }
    }
}
