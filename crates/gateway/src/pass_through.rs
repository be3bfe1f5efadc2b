//! ModelInfer and ModelStreamInfer at the gateway, served on the bytes that came: each
//! request is read only as far as routing needs (`infermesh_core::raw`) and goes on to its
//! worker as it came; each answer goes back to the client as the worker wrote it, under
//! the client's id. Every other call of the service goes to the generated server.

use std::{
    convert::Infallible,
    marker::PhantomData,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Buf;
use futures::future::BoxFuture;
use infermesh_core::{
    raw::{RawAnswer, RawRequest, RawStreamed},
    stream::ResponseStream,
};
use infermesh_proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use tonic::{
    body::Body,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::{Grpc, NamedService, StreamingService, UnaryService},
    Request, Response, Status, Streaming,
};

use crate::service::GatewayService;

const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const MODEL_STREAM_INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// `inference.GRPCInferenceService`: inference on raw bytes, the rest generated.
#[derive(Clone)]
pub struct Inference {
    svc: Arc<GatewayService>,
    generated: GrpcInferenceServiceServer<GatewayService>,
    /// `--grpc-max-message-bytes`, as the generated server has it.
    limit: usize,
}

impl Inference {
    pub fn new(svc: GatewayService, limit: usize) -> Self {
        Self {
            generated: infermesh_core::serve::generated(svc.clone(), limit),
            svc: Arc::new(svc),
            limit,
        }
    }

    fn grpc<E: Wire>(&self) -> Grpc<RawCodec<E>> {
        Grpc::new(RawCodec(PhantomData))
            .apply_max_message_size_config(Some(self.limit), Some(self.limit))
    }
}

impl NamedService for Inference {
    const NAME: &'static str = "inference.GRPCInferenceService";
}

impl tower::Service<http::Request<Body>> for Inference {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match req.uri().path() {
            MODEL_INFER => {
                let mut grpc = self.grpc::<RawAnswer>();
                let unary = Unary(self.svc.clone());
                Box::pin(async move { Ok(grpc.unary(unary, req).await) })
            }
            MODEL_STREAM_INFER => {
                let mut grpc = self.grpc::<RawStreamed>();
                let streams = Streams(self.svc.clone());
                Box::pin(async move { Ok(grpc.streaming(streams, req).await) })
            }
            _ => tower::Service::call(&mut self.generated, req),
        }
    }
}

struct Unary(Arc<GatewayService>);

impl UnaryService<RawRequest> for Unary {
    type Response = RawAnswer;
    type Future = BoxFuture<'static, Result<Response<RawAnswer>, Status>>;

    fn call(&mut self, req: Request<RawRequest>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move { svc.model_infer_raw(req).await })
    }
}

struct Streams(Arc<GatewayService>);

impl StreamingService<RawRequest> for Streams {
    type Response = RawStreamed;
    type ResponseStream = ResponseStream<RawStreamed>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<Streaming<RawRequest>>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move { svc.model_stream_infer_raw(req) })
    }
}

/// Requests in as [`RawRequest`]; answers out as `E` writes itself.
pub struct RawCodec<E>(PhantomData<E>);

/// A message the gateway writes as it is.
pub trait Wire: Send + 'static {
    fn write(&self, buf: &mut EncodeBuf<'_>) -> Result<(), Status>;
}

impl Wire for RawAnswer {
    fn write(&self, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.encode(buf);
        Ok(())
    }
}

impl Wire for RawStreamed {
    fn write(&self, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.encode(buf)
            .map_err(|e| Status::internal(format!("encoding an answer: {e}")))
    }
}

impl<E: Wire> Codec for RawCodec<E> {
    type Encode = E;
    type Decode = RawRequest;
    type Encoder = WireEncoder<E>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> WireEncoder<E> {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

pub struct WireEncoder<E>(PhantomData<E>);

impl<E: Wire> Encoder for WireEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        small_buffers()
    }
}

pub struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = RawRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<RawRequest>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        RawRequest::decode(bytes).map(Some).map_err(|e| {
            // As every generated server of ours says it (infermesh_proto::codec).
            Status::invalid_argument(format!(
                "the message is not a valid ModelInferRequest in protobuf encoding: {e}"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        small_buffers()
    }
}

/// Each stream's read and write buffers start at 1 KiB (tonic's default is 8 KiB each)
/// and grow with the messages that come: an idle stream holds little (1,000 open streams
/// are a gateway's ordinary load), a busy one as much as its messages need.
fn small_buffers() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}
