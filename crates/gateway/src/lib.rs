//! The infermesh gateway: a KServe v2 / Triton gRPC server whose handlers balance every
//! request — every message of a ModelStreamInfer stream included — across the workers
//! where the model version is ready (power of two choices over PeakEWMA × outstanding).

pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod endpoint;
pub mod failure;
pub mod forward;
pub mod guard;
pub mod hedge;
pub mod latency;
pub mod load;
pub mod mesh;
pub mod metrics;
pub mod pass_through;
pub mod placement;
pub mod poison;
pub mod pool;
pub mod rank;
pub mod retry;
pub mod route;
pub mod routes;
pub mod sequence;
pub mod service;
pub mod shadow;
pub mod single_flight;
pub mod stats;

use std::{future::Future, sync::Arc};

pub use config::GatewayConfig;
use infermesh_core::{serve, Lifecycle};
use pool::Pool;
use service::GatewayService;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Startup(String),
}

pub use infermesh_core::serve::Listeners;

/// Runs the gateway until `shutdown` resolves, then drains (the shutdown sequence in docs/configuration.md).
pub async fn run(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let reporter = tonic_health::server::HealthReporter::new();
    let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
    let lifecycle = Lifecycle::new(reporter).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let auth = infermesh_core::auth::Auth::from_args(&config.server.auth, &mut registry)
        .map_err(Error::Startup)?;
    let metrics = metrics::GatewayMetrics::register(&mut registry);
    let placement_metrics = placement::PlacementMetrics::register(&mut registry);
    let routes =
        routes::Routes::load(config.routes.clone(), metrics.clone()).map_err(Error::Startup)?;
    let worker_tls = config
        .worker_tls_ca
        .as_ref()
        .map(|ca| {
            let files = infermesh_core::tls::ClientFiles {
                ca: Some(ca.clone()),
                identity: config
                    .worker_tls_cert
                    .clone()
                    .zip(config.worker_tls_key.clone()),
            };
            infermesh_core::tls::ClientTls::load(files, config.worker_tls_server_name.as_deref())
                .map_err(|e| Error::Startup(format!("--worker-tls-*: {e}")))
        })
        .transpose()?;
    let pool = Pool::new(
        config.worker_refresh,
        endpoint::Connect {
            timeout: config.worker_connect_timeout,
            keepalive_interval: config.worker_keepalive_interval,
            keepalive_timeout: config.worker_keepalive_timeout,
            tls: worker_tls.clone(),
        },
        metrics.clone(),
    );
    let changes = match &config.workers_dns {
        Some(target) => discovery::follow_dns(
            target.clone(),
            config.dns_server,
            config.dns_family,
            config.dns_refresh,
            metrics.dns_failures.clone(),
        )
        .map_err(Error::Startup)?,
        None => discovery::fixed(&config.workers),
    };
    let following = tokio::spawn(pool.clone().follow(changes));
    infermesh_core::busy_poll::start(std::time::Duration::from_micros(config.busy_poll_us));
    let addresses = listeners
        .addresses()
        .map_err(|e| Error::Startup(e.to_string()))?;
    tracing::info!(
        address = %addresses[0],
        metrics = %addresses[1],
        health = %addresses[2],
        http = %listeners.http_address().map_err(|e| Error::Startup(e.to_string()))?,
        workers = ?config.workers,
        workers_dns = ?config.workers_dns,
        version = infermesh_core::VERSION,
        "infermesh gateway listening"
    );

    let placer = placement::Placer::new(
        pool.clone(),
        routes.clone(),
        placement::Settings {
            max_queue: config.placement_queue,
            load_timeout: config.placement_load_timeout,
            scaling: placement::Scaling {
                inflight: config.placement_copy_inflight,
                window: config.placement_copy_window,
            },
            drain_timeout: config.server.drain_timeout,
        },
        placement_metrics,
    );
    let keeper = tokio::spawn(placer.clone().keep(std::time::Duration::from_secs(1)));
    let health_task = tokio::spawn(follow_health(
        pool.clone(),
        lifecycle.clone(),
        config.worker_refresh / 2,
    ));
    let members = pool.clone();

    let budget = infermesh_core::admission::ByteBudget::new(config.max_inflight_bytes);
    let forwarding = Arc::new(mesh::Forwarding {
        pool: pool.clone(),
        routes: routes.clone(),
        latency: Default::default(),
        budget: retry::budget(config.retry_budget_ratio),
        quarantine: poison::Quarantine::new(config.poison_quarantine, metrics.poison.clone()),
        metrics: metrics.clone(),
        bytes: budget.clone(),
        shadows: shadow::Shadows::new(pool.clone(), &budget),
        placer,
        sticky: sequence::Sticky::new(config.sequence_idle_timeout, config.max_sequences, &metrics),
    });
    let shadows = forwarding.clone();
    let admin = admin::Admin::server(forwarding.clone());
    let service = GatewayService {
        pool: pool.clone(),
        bytes: budget.clone(),
        lifecycle: lifecycle.clone(),
        stats: Default::default(),
        control: config.model_control_mode,
        max_stream_inflight: config.max_stream_inflight,
        forwarding,
        flights: Default::default(),
        metrics,
    };
    let parts = serve::Parts {
        listeners,
        lifecycle,
        budget,
        health,
        auth,
        registry,
        watched: worker_tls
            .iter()
            .map(|t| t.watched("worker-tls"))
            .chain(routes.watched())
            .collect(),
        extra_services: &["infermesh.admin.v1.Routes"],
    };
    let served = serve::serve_routes(
        |limit| {
            tonic::service::Routes::new(pass_through::Inference::new(service, limit))
                .add_service(admin)
        },
        parts,
        &config.server,
        shutdown,
    )
    .await
    .map_err(|e| Error::Startup(format!("gRPC server failed: {e}")));
    // Nothing of the gateway outlives `run`: discovery, health and every worker's
    // refresher and connections stop with it (it may run inside a longer-lived process).
    following.abort();
    health_task.abort();
    keeper.abort();
    shadows.shadows.stop();
    members.close();
    served
}

/// Health follows the pool: "" is SERVING while at least one worker is ready; each model
/// any worker lists is SERVING while a ready worker has it ready, NOT_SERVING otherwise
/// (also once no worker lists it any more, so a client watching it hears the change).
async fn follow_health(pool: Arc<Pool>, lifecycle: Lifecycle, every: std::time::Duration) {
    let mut last: std::collections::BTreeMap<String, bool> = Default::default();
    loop {
        let mut now = pool.model_health();
        for name in last.keys() {
            now.entry(name.clone()).or_insert(false);
        }
        now.insert(String::new(), pool.any_ready());
        // A model called "liveness" must not take over the liveness probe's entry.
        now.remove(infermesh_core::lifecycle::LIVENESS);
        for (name, serving) in &now {
            if last.get(name) != Some(serving) {
                lifecycle.set(name, *serving).await;
            }
        }
        last = now;
        tokio::time::sleep(every).await;
    }
}
