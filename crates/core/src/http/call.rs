//! The HTTP door calls the server's own gRPC stack in process: a request becomes the
//! protobuf message the gRPC path takes, framed as gRPC, and goes through the same
//! layers (auth, byte admission, the connection's call count) to the same handlers, so
//! both doors share one path below the protocol. The answer's status, message and reason
//! come back from its trailers.

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::{body::Body, Status};

/// The server's gRPC stack, as every gRPC call goes through it.
pub type Stack =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// Headers a client's HTTP request passes on to the call: credentials, trace context and
/// the deadline (`grpc-timeout`, checked by `routes` before any call).
const PASSED: [&str; 5] = [
    "authorization",
    "traceparent",
    "tracestate",
    "baggage",
    "grpc-timeout",
];

/// Calls `path` (e.g. `/inference.GRPCInferenceService/ModelInfer`) with `msg`.
pub async fn call<Resp: prost::Message + Default>(
    stack: &Stack,
    path: &'static str,
    msg: &impl prost::Message,
    from: &http::request::Parts,
) -> Result<Resp, Status> {
    Ok(call_with_metadata(stack, path, msg, from).await?.0)
}

/// [`call`], and the answer's headers (its gRPC metadata).
pub async fn call_with_metadata<Resp: prost::Message + Default>(
    stack: &Stack,
    path: &'static str,
    msg: &impl prost::Message,
    from: &http::request::Parts,
) -> Result<(Resp, http::HeaderMap), Status> {
    let len = msg.encoded_len();
    let mut framed = BytesMut::with_capacity(5 + len);
    framed.put_u8(0);
    framed.put_u32(
        u32::try_from(len).map_err(|_| Status::resource_exhausted("request larger than 4 GiB"))?,
    );
    msg.encode(&mut framed).expect("capacity reserved");
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    for name in PASSED {
        for v in from.headers.get_all(name) {
            req = req.header(name, v);
        }
    }
    let mut req = req
        .body(Body::new(http_body_util::Full::new(framed.freeze())))
        .map_err(|e| Status::internal(format!("building the call: {e}")))?;
    // The connection's state (its open calls, its refused credentials) follows the call.
    if let Some(conn) = from.extensions.get::<crate::conn::ConnInfo>() {
        req.extensions_mut().insert(conn.clone());
    }
    // Authenticated before its body was read: the auth layer takes the caller as found.
    if let Some(caller) = from.extensions.get::<crate::auth::Caller>() {
        req.extensions_mut().insert(caller.clone());
    }
    let resp = tower::ServiceExt::oneshot(stack.clone(), req)
        .await
        .unwrap_or_else(|never| match never {});
    // A trailers-only answer carries its status in the headers.
    if let Some(status) =
        Status::from_header_map(resp.headers()).filter(|s| s.code() != tonic::Code::Ok)
    {
        return Err(status);
    }
    let (head, body) = resp.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| Status::internal(format!("reading the answer: {e}")))?;
    let trailers = collected.trailers().cloned();
    let mut data = collected.to_bytes();
    if let Some(status) = trailers
        .as_ref()
        .and_then(Status::from_header_map)
        .filter(|s| s.code() != tonic::Code::Ok)
    {
        return Err(status);
    }
    Ok((message(&mut data)?, head.headers))
}

/// The one message of a unary answer's body.
fn message<Resp: prost::Message + Default>(data: &mut Bytes) -> Result<Resp, Status> {
    if data.len() < 5 || data[0] != 0 {
        return Err(Status::internal(
            "the answer is not one uncompressed gRPC message",
        ));
    }
    data.advance(1);
    let len = data.get_u32() as usize;
    if len > data.len() {
        return Err(Status::internal("the answer's message is cut short"));
    }
    Resp::decode(data.split_to(len))
        .map_err(|e| Status::internal(format!("the answer does not decode: {e}")))
}
