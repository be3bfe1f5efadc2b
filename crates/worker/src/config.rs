//! The worker's flags. Triton's names where Triton has one.

use std::path::PathBuf;

use infermesh_core::ServerArgs;

/// Serve ONNX models from a Triton-layout model repository over the KServe v2 / Triton
/// gRPC protocol.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "infermesh-worker", version = infermesh_core::VERSION, args_override_self = true)]
pub struct WorkerConfig {
    /// Model repository in Triton's layout: <dir>/<model>/<version>/model.onnx.
    #[arg(long, env = "INFERMESH_MODEL_REPOSITORY")]
    pub model_repository: PathBuf,

    /// ONNX Runtime shared library (libonnxruntime.so). Falls back to ORT_DYLIB_PATH, then
    /// to the copy beside the binary or the one `scripts/fetch-ort.sh` downloads.
    #[arg(long, env = "INFERMESH_ONNXRUNTIME_LIB")]
    pub onnxruntime_lib: Option<PathBuf>,

    /// Instance kind for models without a config: auto uses CUDA when it really
    /// initialises and falls back to CPU (logged); gpu fails the load without CUDA.
    #[arg(
        long,
        env = "INFERMESH_DEFAULT_INSTANCE_KIND",
        value_enum,
        default_value = "auto"
    )]
    pub default_instance_kind: InstanceKind,

    /// max_batch_size given to models without a config whose inputs and outputs all start
    /// with an open dim (Triton's auto-complete does the same with its default of 4; larger
    /// suits batching CPU models). 0 serves such models unbatched.
    #[arg(long, env = "INFERMESH_DEFAULT_MAX_BATCH_SIZE", default_value_t = 8)]
    pub default_max_batch_size: usize,

    /// ONNX Runtime intra-op threads per instance; 0 lets ONNX Runtime use one per core.
    #[arg(long, env = "INFERMESH_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,

    /// Let ONNX Runtime's pool threads spin between runs (its own default): a little lower
    /// latency for a lone caller, but they burn the cores the gRPC threads need under load.
    #[arg(long, env = "INFERMESH_INTRA_OP_SPINNING", default_value_t = false, action = clap::ArgAction::Set)]
    pub intra_op_spinning: bool,

    /// Requests that may wait for an instance, per model; beyond it RESOURCE_EXHAUSTED.
    #[arg(long, env = "INFERMESH_MAX_QUEUE_SIZE", default_value_t = 1024)]
    pub max_queue_size: usize,

    /// Bound on request bytes held in memory at once (all models), counted from the first
    /// byte that arrives; beyond it requests get RESOURCE_EXHAUSTED instead of the process
    /// growing toward an out-of-memory kill. Keep it below the container's memory limit
    /// (the manifests: 3 GiB of 4 GiB). 0 = unbounded.
    #[arg(long, env = "INFERMESH_MAX_INFLIGHT_BYTES", default_value_t = 3 << 30)]
    pub max_inflight_bytes: usize,

    /// none: load every model at start, refuse Load/Unload. explicit: load only
    /// --load-model names at start, then what RepositoryModelLoad/Unload ask. poll: like
    /// none, and rescan the repository every --repository-poll-secs for changes.
    /// placement: list every model, load only --load-model names at start (pinned: never
    /// evicted or unloaded); RepositoryModelLoad loads a model within
    /// --model-memory-bytes, evicting the least recently used idle models to make room
    /// (a READY model unchanged on disk is only marked used); Unload unloads.
    #[arg(
        long,
        env = "INFERMESH_MODEL_CONTROL_MODE",
        value_enum,
        default_value = "none"
    )]
    pub model_control_mode: crate::control::ModelControlMode,

    /// With --model-control-mode explicit: a model to load at start (repeatable; * = all).
    #[arg(
        long = "load-model",
        env = "INFERMESH_LOAD_MODEL",
        value_delimiter = ','
    )]
    pub load_model: Vec<String>,

    /// With --model-control-mode poll: seconds between repository scans (Triton's
    /// default is 15).
    #[arg(long, env = "INFERMESH_REPOSITORY_POLL_SECS", default_value_t = 15.0)]
    pub repository_poll_secs: f64,

    /// How long a request may wait for an instance when neither it (grpc-timeout, Triton's
    /// `timeout`) nor its model's config (`default_queue_policy`) sets a deadline; past it
    /// the request is answered DEADLINE_EXCEEDED and never runs. 0 = no limit (Triton's
    /// default).
    #[arg(long, env = "INFERMESH_DEFAULT_QUEUE_TIMEOUT", default_value = "0s", value_parser = infermesh_core::config::parse_duration)]
    pub default_queue_timeout: std::time::Duration,

    /// Report SERVING with no model ready, once the models named at start have loaded.
    /// For explicit mode with nothing preloaded: a NOT_SERVING worker leaves a headless
    /// Service, so the gateway could never reach it to load a model. Without it a worker
    /// is SERVING only while at least one model is READY.
    #[arg(long, env = "INFERMESH_ALLOW_EMPTY_REPOSITORY")]
    pub allow_empty_repository: bool,

    /// Models that may be loaded at once; a RepositoryModelLoad of another model beyond it
    /// gets RESOURCE_EXHAUSTED (reloading a loaded model is always allowed). 0 = no cap.
    #[arg(long, env = "INFERMESH_MAX_MODELS", default_value_t = 0)]
    pub max_models: usize,

    /// Triton's response cache: `local,size=BYTES` (repeatable, one setting each) keeps
    /// answers of models whose config sets `response_cache { enable: true }`, in at most
    /// BYTES (keys and bookkeeping counted), least recently used evicted first. Without
    /// it nothing is cached.
    #[arg(
        long = "cache-config",
        env = "INFERMESH_CACHE_CONFIG",
        value_name = "local,size=BYTES"
    )]
    pub cache_config: Vec<String>,

    /// With --model-control-mode placement: the memory loaded models may take, as measured
    /// (each load's growth of the resident set). Default: half the cgroup's memory limit,
    /// or of the host's memory where there is none.
    #[arg(long, env = "INFERMESH_MODEL_MEMORY_BYTES")]
    pub model_memory_bytes: Option<u64>,

    /// With --model-control-mode placement: a model used more recently than this is not
    /// evicted to make room for another (the churn guard); a load that would need it
    /// is refused (churn-guard). Default 30s.
    #[arg(long, env = "INFERMESH_MODEL_MIN_IDLE", value_parser = infermesh_core::config::parse_duration)]
    pub model_min_idle: Option<std::time::Duration>,

    /// Sequences a stateful model (sequence_batching) keeps at once, at most: its slots are
    /// Triton's (max_batch_size per instance for `direct`, max_candidate_sequences for
    /// `oldest`) up to this bound. A new sequence beyond them waits for one to end, within
    /// its deadline; beyond max_queue_size waiting it gets RESOURCE_EXHAUSTED
    /// (sequence-slots-full).
    #[arg(long, env = "INFERMESH_MAX_SEQUENCE_SLOTS", default_value_t = 1024)]
    pub max_sequence_slots: usize,

    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InstanceKind {
    Auto,
    Cpu,
    Gpu,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks flag and id clashes (shared flags are flattened in) only when asked.
    #[test]
    fn flags_are_consistent() {
        super::WorkerConfig::command().debug_assert();
    }
}
