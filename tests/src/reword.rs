//! A proxy in front of a worker that rewrites the words of every failure — unary status
//! messages and stream `error_message`s — and keeps everything else (codes, status
//! details, parameters). A gateway behind it must route, retry and eject exactly as
//! behind the worker itself: decisions come from codes and reasons, never from words.

use std::{net::SocketAddr, pin::Pin};

use futures::{Stream, StreamExt};
use infermesh_proto::{
    self as pb,
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::{
    health_client::HealthClient,
    health_server::{Health, HealthServer},
    HealthCheckRequest, HealthCheckResponse,
};

/// What every failure says behind the proxy.
pub const WORDS: &str = "reworded: nothing to read here";

fn reword(s: Status) -> Status {
    Status::with_details(s.code(), WORDS, s.details().to_vec().into())
}

#[derive(Clone)]
struct Proxy {
    worker: crate::Client,
    health: HealthClient<tonic::transport::Channel>,
}

/// The request with its metadata (deadline, trace context), as the worker should see it.
fn pass<T>(r: Request<T>) -> Request<T> {
    let (metadata, _, message) = r.into_parts();
    Request::from_parts(metadata, Default::default(), message)
}

type Answer<T> = Result<Response<T>, Status>;

/// Unary RPCs passed to the worker. Written in the form `async_trait` gives the trait's
/// methods: an attribute macro does not see inside a macro call in its impl.
macro_rules! forward {
    ($($method:ident($req:ident) -> $resp:ident;)*) => {
        $(
            fn $method<'life0, 'async_trait>(
                &'life0 self,
                r: Request<pb::$req>,
            ) -> Pin<Box<dyn std::future::Future<Output = Answer<pb::$resp>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { self.worker.clone().$method(pass(r)).await.map_err(reword) })
            }
        )*
    };
}

#[tonic::async_trait]
impl GrpcInferenceService for Proxy {
    forward! {
        server_live(ServerLiveRequest) -> ServerLiveResponse;
        server_ready(ServerReadyRequest) -> ServerReadyResponse;
        model_ready(ModelReadyRequest) -> ModelReadyResponse;
        server_metadata(ServerMetadataRequest) -> ServerMetadataResponse;
        model_metadata(ModelMetadataRequest) -> ModelMetadataResponse;
        model_infer(ModelInferRequest) -> ModelInferResponse;
        model_config(ModelConfigRequest) -> ModelConfigResponse;
        model_statistics(ModelStatisticsRequest) -> ModelStatisticsResponse;
        repository_index(RepositoryIndexRequest) -> RepositoryIndexResponse;
        repository_model_load(RepositoryModelLoadRequest) -> RepositoryModelLoadResponse;
        repository_model_unload(RepositoryModelUnloadRequest) -> RepositoryModelUnloadResponse;
        system_shared_memory_status(SystemSharedMemoryStatusRequest) -> SystemSharedMemoryStatusResponse;
        system_shared_memory_register(SystemSharedMemoryRegisterRequest) -> SystemSharedMemoryRegisterResponse;
        system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest) -> SystemSharedMemoryUnregisterResponse;
        cuda_shared_memory_status(CudaSharedMemoryStatusRequest) -> CudaSharedMemoryStatusResponse;
        cuda_shared_memory_register(CudaSharedMemoryRegisterRequest) -> CudaSharedMemoryRegisterResponse;
        cuda_shared_memory_unregister(CudaSharedMemoryUnregisterRequest) -> CudaSharedMemoryUnregisterResponse;
        trace_setting(TraceSettingRequest) -> TraceSettingResponse;
        log_settings(LogSettingsRequest) -> LogSettingsResponse;
    }

    type ModelStreamInferStream =
        Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Answer<Self::ModelStreamInferStream> {
        let (metadata, _, inbound) = r.into_parts();
        let inbound = inbound
            .take_while(|m| std::future::ready(m.is_ok()))
            .filter_map(|m| std::future::ready(m.ok()));
        let call = Request::from_parts(metadata, Default::default(), inbound);
        let answers = self
            .worker
            .clone()
            .model_stream_infer(call)
            .await
            .map_err(reword)?;
        let answers = answers.into_inner().map(|m| {
            m.map(|mut m| {
                if !m.error_message.is_empty() {
                    m.error_message = WORDS.into();
                }
                m
            })
            .map_err(reword)
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

#[tonic::async_trait]
impl Health for Proxy {
    async fn check(&self, r: Request<HealthCheckRequest>) -> Answer<HealthCheckResponse> {
        self.health.clone().check(pass(r)).await.map_err(reword)
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(&self, r: Request<HealthCheckRequest>) -> Answer<Self::WatchStream> {
        let updates = self.health.clone().watch(pass(r)).await.map_err(reword)?;
        Ok(Response::new(Box::pin(
            updates.into_inner().map(|u| u.map_err(reword)),
        )))
    }
}

/// A rewording proxy on 127.0.0.1:0 in front of the worker at `worker`.
pub struct Reworder {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Reworder {
    pub async fn start(worker: &crate::Worker) -> Reworder {
        let channel = tonic::transport::Endpoint::from_shared(worker.url())
            .unwrap()
            .connect_lazy();
        let proxy = Proxy {
            worker: crate::Client::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            health: HealthClient::new(channel),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(
                    GrpcInferenceServiceServer::new(proxy.clone())
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX),
                )
                .add_service(HealthServer::new(proxy))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Reworder {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Stops at once: a gateway in this process keeps its connections (and a health
    /// watch) open after it stopped, which a graceful shutdown would wait for.
    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.abort();
        let _ = self.task.await;
    }
}
