//! The infermesh worker: a Triton-layout model repository served over the KServe v2 /
//! Triton gRPC protocol, with ONNX Runtime sessions each owned by its own OS thread.

pub mod batch;
pub mod cache;
pub mod classify;
pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod instance;
pub mod metrics;
pub mod model;
pub mod model_config;
pub mod placement;
pub mod repository;
pub mod scheduler;
pub mod sequence;
pub mod service;
pub mod stats;
pub mod warmup;

use std::{future::Future, path::PathBuf, sync::Arc};

pub use config::{InstanceKind, WorkerConfig};
use control::{Control, ModelControlMode};
use engine::onnx::{self, DeviceRequest};
pub use error::Error;
use infermesh_core::{serve, Lifecycle};
use metrics::WorkerMetrics;
use model::Defaults;
use repository::Repository;
use service::WorkerService;

/// Picks the ONNX Runtime library: flag/env, then ORT_DYLIB_PATH, then known places.
pub fn onnxruntime_library(config: &WorkerConfig) -> Result<PathBuf, Error> {
    if let Some(p) = &config.onnxruntime_lib {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(p.into());
    }
    onnx::default_library_candidates()
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Startup(
                "ONNX Runtime library not found. Run scripts/fetch-ort.sh (it downloads the onnxruntime \
                 wheel from PyPI) and pass the path it prints with --onnxruntime-lib or \
                 INFERMESH_ONNXRUNTIME_LIB."
                    .into(),
            )
        })
}

pub use infermesh_core::serve::Listeners;

/// Runs the worker until `shutdown` resolves, then drains (the shutdown sequence in docs/configuration.md).
pub async fn run(
    config: WorkerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    onnx::init(&onnxruntime_library(&config)?)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let auth = infermesh_core::auth::Auth::from_args(&config.server.auth, &mut registry)
        .map_err(Error::Startup)?;
    let metrics = WorkerMetrics::register(&mut registry);
    let reporter = tonic_health::server::HealthReporter::new();
    let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
    let lifecycle = Lifecycle::new(reporter).await;
    let cache = cache::parse_config(&config.cache_config)
        .map_err(Error::Startup)?
        .map(|size| Arc::new(cache::ResponseCache::new(size, metrics.cache.clone())));
    let repo = Arc::new(Repository::new(
        config.model_repository.clone(),
        metrics.clone(),
        cache.clone(),
    ));
    // A typo in the path must not give a Ready pod that serves nothing: refuse to start.
    std::fs::read_dir(&config.model_repository).map_err(|e| {
        Error::Startup(format!(
            "cannot read the model repository {} (--model-repository): {e}",
            config.model_repository.display()
        ))
    })?;
    let addresses = listeners
        .addresses()
        .map_err(|e| Error::Startup(e.to_string()))?;
    tracing::info!(
        address = %addresses[0],
        metrics = %addresses[1],
        health = %addresses[2],
        http = %listeners.http_address().map_err(|e| Error::Startup(e.to_string()))?,
        repository = %config.model_repository.display(),
        mode = ?config.model_control_mode,
        version = infermesh_core::VERSION,
        "infermesh worker listening"
    );

    let budget = infermesh_core::admission::ByteBudget::new(config.max_inflight_bytes);
    // Models load in the background so liveness and health (NOT_SERVING) answer at once.
    let defaults = Defaults {
        device: match config.default_instance_kind {
            InstanceKind::Auto => DeviceRequest::Auto(0),
            InstanceKind::Cpu => DeviceRequest::Cpu,
            InstanceKind::Gpu => DeviceRequest::Gpu(0),
        },
        intra_op_threads: config.intra_op_threads,
        intra_op_spinning: config.intra_op_spinning,
        cache: cache.is_some(),
        default_max_batch_size: config.default_max_batch_size,
        queue_capacity: config.max_queue_size,
        queue_timeout: (!config.default_queue_timeout.is_zero())
            .then_some(config.default_queue_timeout),
        metrics: metrics.clone(),
        budget: budget.clone(),
        max_sequence_slots: config.max_sequence_slots,
    };
    let placement = placement_of(&config, &metrics)?;
    let control = Arc::new(Control::new(
        repo.clone(),
        config.model_control_mode,
        defaults,
        lifecycle.clone(),
        config.max_models,
        config.allow_empty_repository,
        placement.clone(),
    ));
    let watcher = placement::watch::Watcher::start(repo.clone(), placement);
    {
        let control = control.clone();
        let (load, poll) = (config.load_model.clone(), config.repository_poll_secs);
        tokio::spawn(async move {
            if let Err(e) = control.initial(&load).await {
                tracing::error!(error = %e, "loading the model repository failed");
            }
            control.started().await;
            let empty = control.repo.names().is_empty();
            let ready = control.repo.any_ready();
            match (ready, empty, control.can_serve()) {
                (true, _, _) => tracing::info!("model loading finished; SERVING"),
                (false, _, true) => tracing::warn!(
                    "no model is ready; SERVING anyway (--allow-empty-repository): load models with RepositoryModelLoad"
                ),
                (false, true, false) => tracing::error!(
                    repository = %control.repo.root().display(),
                    "the model repository has no models (expected <model>/<version>/model.onnx); health stays NOT_SERVING until one is ready (--allow-empty-repository to serve anyway)"
                ),
                (false, false, false) => {
                    tracing::error!("no model could be loaded; health stays NOT_SERVING until one is ready")
                }
            }
            if control.mode == ModelControlMode::Poll {
                control
                    .poll(std::time::Duration::from_secs_f64(poll.max(0.05)))
                    .await;
            }
        });
    }

    let service = WorkerService {
        repo,
        control,
        lifecycle: lifecycle.clone(),
        budget: budget.clone(),
        metrics,
        cache,
    };
    let watch = infermesh_proto::placement::placement_server::PlacementServer::new(
        placement::watch::WatchService(watcher, lifecycle.clone()),
    );
    let parts = serve::Parts {
        listeners,
        lifecycle,
        budget,
        health,
        auth,
        registry,
        watched: Vec::new(),
        extra_services: &["infermesh.placement.v1.Placement"],
    };

    serve::serve_routes(
        |limit| tonic::service::Routes::new(serve::generated(service, limit)).add_service(watch),
        parts,
        &config.server,
        shutdown,
    )
    .await
    .map_err(|e| Error::Startup(format!("gRPC server failed: {e}")))
}

/// Placement's capacity and churn guard; their flags are refused in any other mode.
fn placement_of(
    config: &WorkerConfig,
    metrics: &WorkerMetrics,
) -> Result<Option<Arc<placement::Placement>>, Error> {
    if config.model_control_mode != ModelControlMode::Placement {
        let given = [
            ("--model-memory-bytes", config.model_memory_bytes.is_some()),
            ("--model-min-idle", config.model_min_idle.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            return Err(Error::Startup(format!(
                "{flag} applies only with --model-control-mode placement"
            )));
        }
        return Ok(None);
    }
    let capacity = match config.model_memory_bytes {
        Some(0) => {
            return Err(Error::Startup(
                "--model-memory-bytes 0: models need some memory".into(),
            ))
        }
        Some(n) => n,
        None => placement::memory::limit()
            .map(|l| (l as f64 * placement::DEFAULT_SHARE) as u64)
            .ok_or_else(|| {
                Error::Startup(
                    "--model-memory-bytes: no cgroup limit or host memory to take a share of; give it".into(),
                )
            })?,
    };
    let min_idle = config
        .model_min_idle
        .unwrap_or(std::time::Duration::from_secs(30));
    tracing::info!(capacity, ?min_idle, "placement: models load on request");
    Ok(Some(Arc::new(placement::Placement::new(
        capacity,
        min_idle,
        metrics.placement.clone(),
    ))))
}
