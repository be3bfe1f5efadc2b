//! `serve()`: one accept loop and one shutdown sequence for every infermesh server.
//!
//! Shutdown (docs/configuration.md): signal → health NOT_SERVING at once → keep serving for
//! `--shutdown-grace` → refuse new requests with UNAVAILABLE → GOAWAY every connection and
//! let in-flight requests and streams finish within `--drain-timeout` → return.

use std::{future::Future, net::SocketAddr};

use tokio::net::TcpListener;
use tonic::{service::Routes, transport::Server};

use crate::{config::ServerArgs, Lifecycle};

/// The sockets a server serves on; tests bind `127.0.0.1:0` themselves.
pub struct Listeners {
    pub grpc: TcpListener,
    /// Prometheus `/metrics`; `None` serves no metrics.
    pub metrics: Option<TcpListener>,
    /// Plaintext `grpc.health.v1` alone, for probes; `None` serves no health port.
    pub health: Option<TcpListener>,
    /// KServe v2 HTTP/REST; `None` serves no HTTP port.
    pub http: Option<TcpListener>,
    /// TLS on the gRPC and HTTP ports; `None` is plaintext.
    pub tls: Option<crate::tls::ServerTls>,
}

impl Listeners {
    /// Binds what the flags ask for (port 0 picks a free port).
    pub async fn bind(args: &ServerArgs) -> std::io::Result<Self> {
        Ok(Self {
            grpc: bind(args).await?,
            metrics: bind_metrics(args).await?,
            health: bind_health(args).await?,
            http: bind_http(args).await?,
            tls: load_tls(args)?,
        })
    }

    /// The HTTP port's bound address, or "off".
    pub fn http_address(&self) -> std::io::Result<String> {
        Ok(match &self.http {
            Some(l) => l.local_addr()?.to_string(),
            None => "off".into(),
        })
    }

    /// The bound addresses as a server logs them at start: `address`, `metrics` and
    /// `health` ("off" for those not served).
    pub fn addresses(&self) -> std::io::Result<[String; 3]> {
        let off = |l: &Option<TcpListener>| -> std::io::Result<String> {
            Ok(match l {
                Some(l) => l.local_addr()?.to_string(),
                None => "off".into(),
            })
        };
        Ok([
            self.grpc.local_addr()?.to_string(),
            off(&self.metrics)?,
            off(&self.health)?,
        ])
    }
}

/// What a KServe v2 server runs on besides its service: sockets, health, and the metrics
/// registry it has filled (process metrics are added here).
pub struct Parts<H> {
    pub listeners: Listeners,
    pub lifecycle: Lifecycle,
    /// The process's request byte budget (`--max-inflight-bytes`): request bodies count
    /// against it from their first byte.
    pub budget: crate::admission::ByteBudget,
    /// `grpc.health.v1`; with auth, a single model's health needs `read`.
    pub health: H,
    pub registry: prometheus_client::registry::Registry,
    /// Files to reload besides the gRPC port's TLS material (the gateway's client
    /// certificate); one watcher serves them all.
    pub watched: Vec<crate::watch::Watched>,
    /// Tenants and their rights (`--auth-config`); None lets every caller do everything.
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
    /// Services served beyond inference, health and reflection (the gateway's admin
    /// API), so reflection lists exactly what this server answers.
    pub extra_services: &'static [&'static str],
}

/// Serves an `inference.GRPCInferenceService` (with the message-size flags), health,
/// reflection and `/metrics` until `shutdown` resolves, then drains.
pub async fn serve_inference<S, H>(
    service: S,
    parts: Parts<H>,
    args: &ServerArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    S: infermesh_proto::grpc_inference_service_server::GrpcInferenceService,
    H: tonic_health::pb::health_server::Health,
{
    serve_routes(
        |limit| Routes::new(generated(service, limit)),
        parts,
        args,
        shutdown,
    )
    .await
}

/// The generated server of `service`, with the message-size limit. The size limit lives
/// where bytes are counted: the admission layer refuses a message over it at its 5-byte
/// prefix (RESOURCE_EXHAUSTED, reason over-budget) before tonic's decoder sees a byte.
/// tonic's own limit, the same, stays as a second line that never answers first (no
/// compression is accepted, so declared and decoded sizes agree).
pub fn generated<S>(
    service: S,
    limit: usize,
) -> infermesh_proto::grpc_inference_service_server::GrpcInferenceServiceServer<S>
where
    S: infermesh_proto::grpc_inference_service_server::GrpcInferenceService,
{
    infermesh_proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(service)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}

/// As [`serve_inference`], with the inference routes `routes` makes for the
/// message-size limit (`--grpc-max-message-bytes`).
pub async fn serve_routes<H>(
    routes: impl FnOnce(usize) -> Routes,
    parts: Parts<H>,
    args: &ServerArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    H: tonic_health::pb::health_server::Health,
{
    let Parts {
        mut listeners,
        lifecycle,
        budget,
        health,
        mut registry,
        mut watched,
        auth,
        extra_services,
    } = parts;
    registry.register_collector(Box::new(crate::process_metrics::ProcessCollector));
    let health = tonic_health::pb::health_server::HealthServer::new(crate::health_guard::Guarded {
        inner: health,
        auth: auth.clone(),
    });
    let reloads = crate::watch::register(&mut registry);
    watched.extend(listeners.tls.iter().map(|t| t.watched()));
    watched.extend(auth.iter().flat_map(|a| a.watched()));
    // Stops when serving ends.
    let _watching = crate::watch::spawn(watched, crate::watch::PERIOD, reloads);
    crate::trace::register(&mut registry);
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(listener) = listeners.metrics.take() {
        tokio::spawn(crate::metrics::serve(
            listener,
            std::sync::Arc::new(registry),
            async {
                let _ = metrics_stopped.await;
            },
        ));
    }
    let limit = args.grpc_max_message_bytes;
    let guards = Guards {
        budget: budget.clone(),
        body: crate::admission::body::Admission::new(crate::admission::body::Limits {
            budget,
            max_message: limit,
            max_message_is: "--grpc-max-message-bytes",
            stall: args.grpc_stall_timeout,
            min_rate: args.grpc_min_receive_rate,
        }),
        auth,
    };
    let served = serve(
        (routes(limit), extra_services),
        listeners,
        args,
        guards,
        lifecycle,
        health,
        shutdown,
    )
    .await;
    let _ = stop_metrics.send(());
    served
}

/// What every call on the gRPC port passes before a handler: byte accounting and auth.
pub struct Guards {
    pub body: crate::admission::body::Admission,
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
    /// The process's byte budget, which HTTP bodies count against as they arrive.
    pub budget: crate::admission::ByteBudget,
}

/// Binds the gRPC listener from the flags (port 0 picks one).
pub async fn bind(args: &ServerArgs) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(args.grpc_address, args.grpc_port);
    TcpListener::bind(addr)
        .await
        .map_err(|e| which_port(e, "gRPC", addr, "--grpc-address/--grpc-port"))
}

/// A bind error that says which port, at which address, set by which flags.
fn which_port(e: std::io::Error, what: &str, addr: SocketAddr, flags: &str) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        format!("cannot listen for {what} on {addr} ({flags}): {e}"),
    )
}

/// Binds the metrics listener, unless `--allow-metrics false`.
pub async fn bind_metrics(args: &ServerArgs) -> std::io::Result<Option<TcpListener>> {
    if !args.allow_metrics {
        return Ok(None);
    }
    let addr = SocketAddr::new(
        args.metrics_address.unwrap_or(args.grpc_address),
        args.metrics_port,
    );
    TcpListener::bind(addr).await.map(Some).map_err(|e| {
        which_port(
            e,
            "metrics",
            addr,
            "--metrics-address/--metrics-port, or --allow-metrics false",
        )
    })
}

/// The gRPC port's TLS material from the flags (None: plaintext), loaded once so that a
/// bad file stops the server at start with its name.
pub fn load_tls(args: &ServerArgs) -> std::io::Result<Option<crate::tls::ServerTls>> {
    crate::tls::ServerFiles::from_args(&args.tls)
        .and_then(|f| f.map(crate::tls::ServerTls::load).transpose())
        .map_err(std::io::Error::other)
}

/// Binds the HTTP/REST listener, unless `--allow-http false`. Without `--http-port`: 8000
/// (a free port when --grpc-port is 0), and a free port, with a warning, when 8000 is
/// taken (several servers on one host that set their other ports and not this one).
pub async fn bind_http(args: &ServerArgs) -> std::io::Result<Option<TcpListener>> {
    if !args.allow_http {
        return Ok(None);
    }
    let ip = args.http_address.unwrap_or(args.grpc_address);
    let port = args.http_port.unwrap_or(if args.grpc_port == 0 {
        0
    } else {
        DEFAULT_HTTP_PORT
    });
    let addr = SocketAddr::new(ip, port);
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && args.http_port.is_none() => {
            let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
            tracing::warn!(
                taken = %addr,
                http = %l.local_addr()?,
                "the default HTTP/REST port is taken: serving HTTP on a free port instead (set --http-port, or --allow-http false)"
            );
            Ok(Some(l))
        }
        Err(e) => Err(which_port(
            e,
            "HTTP/REST",
            addr,
            "--http-address/--http-port, or --allow-http false",
        )),
    }
}

/// Triton's HTTP port.
pub const DEFAULT_HTTP_PORT: u16 = 8000;

/// Binds the plaintext health listener, unless `--allow-health-port false`.
pub async fn bind_health(args: &ServerArgs) -> std::io::Result<Option<TcpListener>> {
    if !args.allow_health_port {
        return Ok(None);
    }
    let addr = SocketAddr::new(
        args.health_address.unwrap_or(args.grpc_address),
        args.health_port,
    );
    TcpListener::bind(addr).await.map(Some).map_err(|e| {
        which_port(
            e,
            "health",
            addr,
            "--health-address/--health-port, or --allow-health-port false",
        )
    })
}

/// Serves `routes` plus `grpc.health.v1` and reflection (v1 and v1alpha, since grpcurl
/// 1.8 speaks only v1alpha) on the gRPC listener (over TLS when configured), and health
/// alone on the health listener, until `shutdown` resolves, then drains. Metrics are
/// served by the caller. Reflection lists the inference, health and reflection services
/// and `extra_services` (what `routes` serves beyond them).
pub async fn serve(
    (routes, extra_services): (Routes, &[&str]),
    listeners: Listeners,
    args: &ServerArgs,
    guards: Guards,
    lifecycle: Lifecycle,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    // google.rpc too: the ErrorInfo a failure carries in its details, so grpcurl can
    // decode it.
    for fds in [
        infermesh_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ] {
        v1 = v1.register_encoded_file_descriptor_set(fds);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(fds);
    }
    // Only what this server answers: the descriptor sets hold the gateway's admin API too.
    for name in [
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .iter()
    .chain(extra_services)
    {
        v1 = v1.with_service_name(*name);
        v1alpha = v1alpha.with_service_name(*name);
    }
    let v1 = v1
        .build_v1()
        .expect("descriptor sets compiled into the binary are valid");
    let v1alpha = v1alpha
        .build_v1alpha()
        .expect("descriptor sets compiled into the binary are valid");

    let conn_limits = crate::conn::Limits {
        max_connections: args.max_connections,
        handshake_timeout: args.grpc_handshake_timeout,
        idle_timeout: args.grpc_idle_timeout,
        max_per_peer: 0,
    };
    // The health port has the whole connection layer with limits of its own, so neither
    // the main port's traffic nor its own can starve a probe.
    let health_limits = crate::conn::Limits {
        max_connections: args.health_max_connections,
        max_per_peer: args.health_max_connections_per_peer,
        ..conn_limits
    };
    // The health port: the same health service, alone and in plaintext, until this
    // function returns (the sender is dropped then, which stops it).
    let (_stop_health, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let Listeners {
        grpc: listener,
        health: health_listener,
        http: http_listener,
        tls,
        metrics: _,
    } = listeners;
    if let Some(l) = health_listener {
        // Sized so that the port's own connection and stream limits fill it at most: a
        // flood of stalled health calls is refused connections, never a probe's bytes.
        let small = crate::admission::body::Admission::small_only(
            args.grpc_stall_timeout,
            args.grpc_min_receive_rate,
            HEALTH_MESSAGE,
            health_limits
                .max_connections
                .saturating_mul(HEALTH_STREAMS as usize)
                .saturating_mul(HEALTH_MESSAGE),
        );
        let served = connection_layer(Server::builder(), args, HEALTH_STREAMS)
            .layer(crate::panic::CatchPanicLayer)
            .layer(crate::admission::body::CountedLayer(small))
            .layer(crate::conn::CallLayer)
            .add_service(health.clone())
            .serve_with_incoming_shutdown(crate::conn::incoming(l, health_limits, None), async {
                let _ = health_stopped.await;
            });
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::warn!(error = %e, "health port stopped");
            }
        });
    }

    let routes = routes
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);

    // The HTTP door calls the same stack in process: the same layers, the same services.
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut http_task = None;
    if let Some(l) = http_listener {
        let stack = tower::ServiceBuilder::new()
            .layer(crate::panic::CatchPanicLayer)
            .layer(crate::auth::AuthLayer(guards.auth.clone()))
            .layer(crate::admission::body::CountedLayer(guards.body.clone()))
            .layer(crate::conn::CallLayer)
            .service(routes.clone().prepare());
        let door = std::sync::Arc::new(crate::http::Door {
            stack: crate::http::Stack::new(stack),
            admission: guards.body.clone(),
            auth: guards.auth.clone(),
        });
        http_task = Some(tokio::spawn(crate::http::serve(
            l,
            conn_limits,
            tls.clone(),
            door,
            async {
                let _ = http_stopped.await;
            },
            args.drain_timeout,
        )));
    }

    // Auth comes before byte counting: the tenant is known from the headers, so its
    // bytes count against its own share from the first one.
    let mut builder = connection_layer(Server::builder(), args, args.grpc_max_concurrent_streams)
        .layer(crate::panic::CatchPanicLayer)
        .layer(crate::auth::AuthLayer(guards.auth))
        .layer(crate::admission::body::CountedLayer(guards.body))
        .layer(crate::conn::CallLayer);

    // Our own accept loop (see `conn`): TCP_NODELAY per connection (tonic applies it only
    // to listeners it binds itself), the connection cap, the handshake timeout, and a
    // backoff on accept errors such as EMFILE.
    let incoming = crate::conn::incoming(listener, conn_limits, tls);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);

    tokio::select! {
        res = &mut server => return res,
        () = shutdown => {}
    }
    tracing::info!(grace = ?args.shutdown_grace, "shutdown: health NOT_SERVING, still serving");
    lifecycle.drain().await;
    tokio::select! {
        res = &mut server => return res,
        () = tokio::time::sleep(args.shutdown_grace) => {}
    }
    tracing::info!(timeout = ?args.drain_timeout, "shutdown: refusing new requests, draining");
    lifecycle.refuse();
    let _ = stop_tx.send(());
    let _ = stop_http.send(());
    let drained = tokio::time::timeout(args.drain_timeout, server).await;
    // The HTTP door drains within the same timeout, beside gRPC.
    if let Some(task) = http_task {
        let _ = tokio::time::timeout(args.drain_timeout, task).await;
    }
    match drained {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!("shutdown: drain timeout passed with requests still open; exiting");
            Ok(())
        }
    }
}

/// Calls one connection of the health port may have open at once: a probe makes one.
const HEALTH_STREAMS: u32 = 16;
/// Largest message on the health port: a HealthCheckRequest is a service name.
const HEALTH_MESSAGE: usize = 1 << 10;

/// The HTTP/2 settings every port shares: streams per connection, keepalive, age.
fn connection_layer(builder: Server, args: &ServerArgs, streams: u32) -> Server {
    let builder = builder
        .tcp_nodelay(true)
        .max_concurrent_streams(streams)
        .http2_keepalive_interval(
            (!args.grpc_keepalive_time.is_zero()).then_some(args.grpc_keepalive_time),
        )
        .http2_keepalive_timeout(Some(args.grpc_keepalive_timeout));
    match args.max_connection_age.is_zero() {
        true => builder,
        false => builder.max_connection_age(args.max_connection_age),
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `--threads` 0 on the worker: a quarter of the cores, at least 1. Its gRPC threads only
/// move bytes; the cores belong to ONNX Runtime (on 2 cores, 1 thread served 10% more
/// unary requests at concurrency 32 than 2).
pub fn worker_threads(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1)),
        n => n,
    }
}

/// `--threads` 0 on the gateway: 1 up to 2 cores, else one per core. One thread has no
/// cross-thread wake-ups (on 2 cores, unary at concurrency 32: 50 vs 79 µs of CPU per
/// request, 10.6k vs 7.8k requests/s); gateways scale out in replicas, as Linkerd's
/// proxies do, and a bigger one takes a thread per core.
pub fn gateway_threads(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| match n.get() {
            ..=2 => 1,
            n => n,
        }),
        n => n,
    }
}

/// The tokio runtime a server runs on: `threads` 1 is a single-threaded runtime (tasks
/// wake each other without crossing threads), 0 one worker thread per core.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    builder.enable_all().build()
}
