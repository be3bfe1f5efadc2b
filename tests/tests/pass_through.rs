//! The gateway forwards a request's bytes as they came and reads only its routing fields;
//! it must read them as the worker does. Protobuf lets a field appear more than once and
//! anywhere (two encoded messages, concatenated, are one message): the last model name and
//! version win and parameter entries merge by key. Requests built that way go to the
//! gateway (auth, routing, deadline) and straight to the worker, and both read the same.

use bytes::{Buf, BufMut, Bytes};
use infermesh_proto::{infer_parameter::ParameterChoice, ModelInferRequest};
use infermesh_tests::{repo::*, tensors::*, Gateway, Worker};
use prost::Message;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

/// Sends already-encoded bytes as a ModelInferRequest; reads the answer with prost.
#[derive(Default)]
struct BytesCodec;

struct BytesEncoder;
struct AnswerDecoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for AnswerDecoder {
    type Item = infermesh_proto::ModelInferResponse;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        Message::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = infermesh_proto::ModelInferResponse;
    type Encoder = BytesEncoder;
    type Decoder = AnswerDecoder;
    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }
    fn decoder(&mut self) -> AnswerDecoder {
        AnswerDecoder
    }
}

/// ModelInfer with `parts` encoded one after another, as the key's tenant.
async fn call(
    channel: &tonic::transport::Channel,
    parts: &[ModelInferRequest],
) -> Result<String, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let bytes: Vec<u8> = parts.iter().flat_map(Message::encode_to_vec).collect();
    let mut req = tonic::Request::new(Bytes::from(bytes));
    req.metadata_mut()
        .insert("authorization", "Bearer k".parse().unwrap());
    let path = http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
    let resp = grpc.unary(req, path, BytesCodec).await?.into_inner();
    assert_eq!(read_f32(&resp.raw_output_contents[0]), [1.0, 2.0, 3.0, 4.0]);
    Ok(resp.model_name)
}

fn tensors() -> ModelInferRequest {
    request(
        "",
        vec![raw("INPUT0", "FP32", &[4], f32s(&[1.0, 2.0, 3.0, 4.0]))],
    )
}

fn named(model: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        ..Default::default()
    }
}

fn versioned(version: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_version: version.into(),
        ..Default::default()
    }
}

fn timeout(us: i64) -> ModelInferRequest {
    with_param(
        Default::default(),
        "timeout",
        ParameterChoice::Int64Param(us),
    )
}

#[tokio::test]
async fn the_gateway_reads_repeated_fields_as_the_worker_does() {
    let repo = Repo::new()
        .identity("echo", &identity_config("", "[ 4 ]"))
        .identity("secret", &identity_config("", "[ 4 ]"))
        .identity("slow", &identity_config(&delay_ms(300), "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let auth = infermesh_tests::one_tenant(dir.path(), "[echo, slow]", "{}");
    let gw = Gateway::spawn_at(&[worker.addr], &["--auth-config", auth.to_str().unwrap()]).await;
    let connect = |url: String| {
        tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_lazy()
    };
    let gateway = connect(gw.url());
    infermesh_tests::poll_until("the gateway", || async {
        call(&gateway, &[named("echo"), tensors()]).await.is_ok()
    })
    .await;

    for (url, channel) in [
        (worker.url(), connect(worker.url())),
        (gw.url(), gateway.clone()),
    ] {
        // The last name wins: "echo", which the tenant may call.
        let got = call(&channel, &[named("secret"), tensors(), named("echo")]).await;
        assert_eq!(got.unwrap(), "echo", "{url}");
        // The last version wins: 1, which exists.
        let got = call(
            &channel,
            &[named("echo"), versioned("9"), tensors(), versioned("1")],
        )
        .await;
        assert_eq!(got.unwrap(), "echo", "{url}");
        let err = call(
            &channel,
            &[named("echo"), versioned("1"), tensors(), versioned("9")],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{url}: {err:?}");
    }
    // Parameter entries merge by key, the last one kept. The gateway holds a request to
    // its `timeout` (a worker holds it to the time queued, as Triton does, so this one is
    // the gateway's reading): a 10 s timeout after a 50 ms one is served by the 300 ms
    // model; the other way round it is not.
    let late = [
        named("slow"),
        timeout(50_000),
        tensors(),
        timeout(10_000_000),
    ];
    assert_eq!(call(&gateway, &late).await.unwrap(), "slow");
    let soon = [
        named("slow"),
        timeout(10_000_000),
        tensors(),
        timeout(50_000),
    ];
    let err = call(&gateway, &soon).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The last name wins at the gateway's auth too: "secret" is refused, though the
    // request named "echo" first (reading the first would let it through to the worker).
    let err = call(&gateway, &[named("echo"), tensors(), named("secret")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}
