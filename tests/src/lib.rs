//! Shared helpers for the end-to-end tests: real servers on 127.0.0.1:0, real clients.

pub mod tensors;

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
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

/// A worker running in this process on 127.0.0.1:0.
pub struct Worker {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), infermesh_worker::Error>>,
}

impl Worker {
    /// Starts a worker with extra flags and waits (bounded) until it reports ready.
    pub async fn start(repository: &std::path::Path, extra: &[&str]) -> Worker {
        let worker = Self::spawn(repository, extra).await;
        worker.wait_ready().await;
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(infermesh_worker::run(config, listener, async {
            let _ = stopped.await;
        }));
        Worker {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        GrpcInferenceServiceClient::connect(self.url())
            .await
            .expect("connect")
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Polls ServerReady until true; panics after 60 s (models load in the background).
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = GrpcInferenceServiceClient::connect(self.url()).await {
                if let Ok(r) = c.server_ready(infermesh_proto::ServerReadyRequest {}).await {
                    if r.into_inner().ready {
                        return;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker did not become ready in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), infermesh_worker::Error> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.await.expect("worker task")
    }
}
