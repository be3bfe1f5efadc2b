//! Shared helpers for the end-to-end tests: real servers on 127.0.0.1:0, real clients.

pub mod pki;
pub mod repo;
pub mod reword;
pub mod tensors;

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient, ServerReadyRequest,
};
use infermesh_worker::WorkerConfig;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// The repository root of this checkout.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled model repository.
pub fn models() -> PathBuf {
    root().join("models")
}

/// GET /metrics over plain HTTP/1.1 (no client library needed).
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// One sample from the metrics endpoint at `addr` (exact name and labels), or None.
pub async fn metric_at(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    let text = scrape(addr).await;
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A worker running in this process on 127.0.0.1:0.
pub struct Worker {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// The plaintext health port.
    pub health_addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), infermesh_worker::Error>>,
}

impl Worker {
    /// Starts a worker with extra flags and waits (bounded) until it reports ready.
    pub async fn start(repository: &std::path::Path, extra: &[&str]) -> Worker {
        let worker = Self::spawn(repository, extra).await;
        wait_ready(&worker.url()).await;
        worker
    }

    /// A worker with TLS on its gRPC port (its flags in `extra`), ready as seen by a
    /// client that trusts `ca`.
    pub async fn start_tls(
        repository: &std::path::Path,
        extra: &[&str],
        ca: &std::path::Path,
        identity: Option<&pki::Leaf>,
    ) -> Worker {
        let worker = Self::spawn(repository, extra).await;
        wait_ready_tls(worker.addr, ca, identity).await;
        worker
    }

    /// Starts a worker without waiting for readiness.
    pub async fn spawn(repository: &std::path::Path, extra: &[&str]) -> Worker {
        let mut args = vec![
            "infermesh-worker".to_string(),
            "--model-repository".into(),
            repository.display().to_string(),
            "--grpc-address".into(),
            "127.0.0.1".into(),
            "--grpc-port".into(),
            "0".into(),
            "--shutdown-grace".into(),
            "0s".into(),
            "--drain-timeout".into(),
            "5s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = WorkerConfig::try_parse_from(args).expect("valid flags");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health_addr = health.local_addr().unwrap();
        let listeners = infermesh_worker::Listeners {
            grpc,
            metrics: Some(metrics),
            health: Some(health),
            http: None,
            tls: infermesh_core::serve::load_tls(&config.server).expect("TLS material"),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(infermesh_worker::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Worker {
            addr,
            metrics_addr,
            health_addr,
            stop: Some(stop),
            task,
        }
    }

    /// The value of one metric sample (exact name and labels as exposed), or None.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(self.metrics_addr, series).await
    }

    /// Polls a metric until `pred` holds; panics after 30 s.
    pub async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.metric(series).await {
                if pred(v) {
                    return v;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let text = scrape(self.metrics_addr).await;
                panic!("metric {series} never reached the expected value; /metrics:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        client(&self.url()).await
    }

    /// Signals shutdown and waits for `run` to return.
    /// RepositoryModelUnload of `model` (the worker runs in explicit mode).
    pub async fn unload(&self, model: &str) {
        let unload = infermesh_proto::RepositoryModelUnloadRequest {
            model_name: model.into(),
            ..Default::default()
        };
        self.client()
            .await
            .repository_model_unload(unload)
            .await
            .expect("unload");
    }

    pub async fn stop(mut self) -> Result<(), infermesh_worker::Error> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.await.expect("worker task")
    }
}

/// A gateway running in this process on 127.0.0.1:0, in front of `workers`.
pub struct Gateway {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// The plaintext health port.
    pub health_addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), infermesh_gateway::Error>>,
}

impl Gateway {
    /// Starts a gateway and waits (bounded) until it reports ready.
    pub async fn start(workers: &[&Worker], extra: &[&str]) -> Gateway {
        let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
        Self::start_at(&addrs, extra).await
    }

    /// As [`Gateway::start`], in front of whatever listens at `workers`.
    pub async fn start_at(workers: &[std::net::SocketAddr], extra: &[&str]) -> Gateway {
        let gw = Self::spawn_at(workers, extra).await;
        wait_ready(&gw.url()).await;
        gw
    }

    /// A gateway with TLS on its gRPC port (its flags in `extra`), ready as seen by a
    /// client that trusts `ca`.
    pub async fn start_tls(
        workers: &[std::net::SocketAddr],
        extra: &[&str],
        ca: &std::path::Path,
    ) -> Gateway {
        let gw = Self::spawn_at(workers, extra).await;
        wait_ready_tls(gw.addr, ca, None).await;
        gw
    }

    /// Starts a gateway without waiting for it to be ready.
    pub async fn spawn_at(workers: &[std::net::SocketAddr], extra: &[&str]) -> Gateway {
        let list = workers
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "infermesh-gateway".to_string(),
            "--workers".into(),
            list,
            "--worker-refresh".into(),
            "100ms".into(),
            "--shutdown-grace".into(),
            "0s".into(),
            "--drain-timeout".into(),
            "5s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = infermesh_gateway::GatewayConfig::try_parse_from(args).expect("valid flags");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health_addr = health.local_addr().unwrap();
        let listeners = infermesh_gateway::Listeners {
            grpc,
            metrics: Some(metrics),
            health: Some(health),
            http: None,
            tls: infermesh_core::serve::load_tls(&config.server).expect("TLS material"),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(infermesh_gateway::run(config, listeners, async {
            let _ = stopped.await;
        }));
        Gateway {
            addr,
            metrics_addr,
            health_addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        client(&self.url()).await
    }

    pub async fn stop(mut self) -> Result<(), infermesh_gateway::Error> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.await.expect("gateway task")
    }
}

/// An `--auth-config` file in `dir` with one tenant `t`, key "k", scopes infer and read,
/// the YAML `models` list and `limits` map given.
pub fn one_tenant(dir: &std::path::Path, models: &str, limits: &str) -> PathBuf {
    let path = dir.join("auth.yaml");
    std::fs::write(
        &path,
        format!(
            "tenants:\n  - name: t\n    keys: [\"{}\"]\n    scopes: [infer, read]\n    models: {models}\n    limits: {limits}\n",
            infermesh_core::auth::hash_key("k"),
        ),
    )
    .unwrap();
    path
}

/// A client without message-size limits, for tests that send large tensors.
pub async fn client(url: &str) -> Client {
    GrpcInferenceServiceClient::connect(url.to_string())
        .await
        .expect("connect")
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// Polls ServerReady at `url` until true; panics after 60 s (models load in the
/// background).
pub async fn wait_ready(url: &str) {
    poll_until(url, || async {
        let Ok(mut c) = GrpcInferenceServiceClient::connect(url.to_string()).await else {
            return false;
        };
        is_ready(&mut c, tonic::Request::new(ServerReadyRequest {})).await
    })
    .await
}

/// Polls ServerReady over TLS (the certificate checked for "localhost" against `ca`,
/// `identity` as the client certificate) until true; panics after 60 s.
pub async fn wait_ready_tls(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    identity: Option<&pki::Leaf>,
) {
    poll_until(&format!("{addr} over TLS"), || async {
        let Ok(mut c) = tls_client(addr, ca, identity, "localhost").await else {
            return false;
        };
        is_ready(&mut c, tonic::Request::new(ServerReadyRequest {})).await
    })
    .await
}

/// Whether ServerReady, as `request` asks it, answers true.
pub async fn is_ready(c: &mut Client, request: tonic::Request<ServerReadyRequest>) -> bool {
    c.server_ready(request)
        .await
        .is_ok_and(|r| r.into_inner().ready)
}

/// Polls `ready` until it says true; panics after 60 s, naming `what`.
pub async fn poll_until<F, Fut>(what: &str, ready: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not become ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TLS client: the server's certificate checked against `ca` for `name`, with a client
/// certificate when `identity` is given. Connects at once, so a refused handshake is the
/// error.
pub async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    identity: Option<&pki::Leaf>,
    name: &str,
) -> Result<Client, tonic::transport::Error> {
    let files = infermesh_core::tls::ClientFiles {
        ca: Some(ca.to_path_buf()),
        identity: identity.map(|l| (l.cert.clone(), l.key.clone())),
    };
    let tls = infermesh_core::tls::ClientTls::load(files, Some(name)).expect("client TLS");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tls.connector(None))
        .await?;
    Ok(GrpcInferenceServiceClient::new(channel))
}
