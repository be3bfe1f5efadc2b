//! The one inference-handler frame both servers use. Byte admission, the small calls'
//! pool, the tenant's share and auth happen before it, in the layers of `serve()`; the
//! frame does the rest, once, for every ModelInfer and every ModelStreamInfer message:
//! refusal while draining, the deadline (gRPC's, or Triton's `timeout` parameter, or a
//! stream message's own), the trace context, the tenant's model and quota checks with its
//! metrics record, and the reply's bytes held until written. A server supplies only what
//! answers a request: `handle`.

use std::future::Future;

use infermesh_proto as pb;
use std::time::Instant;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    admission::ByteBudget,
    auth,
    raw::{InferAnswer, InferRequest},
    trace, Lifecycle,
};

/// One inference request as the frame hands it to a server.
pub struct Call<Q = pb::ModelInferRequest> {
    pub req: Q,
    /// The earlier of the call's `grpc-timeout` (for a stream message, the stream's) and
    /// the request's own `timeout` parameter (Triton's, in microseconds).
    pub deadline: Option<Instant>,
    /// What goes on to the next hop when this request has no span of its own.
    pub carry: trace::Carry,
    /// With `--auth-config`: who is calling (checked again per stream message).
    pub caller: Option<auth::Caller>,
}

/// ModelInfer: admitted, traced, checked against the caller's models and quotas, counted,
/// and answered with its bytes held until written.
pub async fn unary<Q, A, Fut>(
    req: Request<Q>,
    lifecycle: &Lifecycle,
    budget: &ByteBudget,
    handle: impl FnOnce(Call<Q>) -> Fut,
) -> Result<Response<A>, Status>
where
    Q: InferRequest,
    A: InferAnswer,
    Fut: Future<Output = Result<A, Status>>,
{
    lifecycle.admit().map_err(Status::from)?;
    let start = Instant::now();
    let call_deadline = crate::deadline::deadline(req.metadata(), None, start);
    let deadline = crate::deadline::of_request(call_deadline, req.get_ref().parameters(), start);
    let (span, carry) = trace::request(
        "ModelInfer",
        req.get_ref().model_name(),
        trace::incoming(req.metadata()),
    );
    let caller = auth::caller(&req);
    let req = req.into_inner();
    let model = req.model_name().to_string();
    let call = Call {
        req,
        deadline,
        carry,
        caller: caller.clone(),
    };
    let resp = auth::infer(caller.as_ref(), &model, handle(call).instrument(span)).await?;
    let len = resp.encoded_len();
    Ok(crate::admission::held(resp, len, budget))
}

/// How a server serves its streams (see [`crate::stream::Options`]).
#[derive(Clone, Debug)]
pub struct StreamFrame {
    pub max_in_flight: usize,
    /// A worker: `infermesh_cancel` cancels, and a message's `traceparent` parameter (a
    /// gateway's, sharing one stream between callers) is its trace parent.
    pub mesh_parameters: bool,
    /// The process budget: answers count against it until written.
    pub replies: ByteBudget,
}

/// ModelStreamInfer: the stream admitted once; each message traced, checked against the
/// caller's current credential, models and quotas, and counted, while the stream goes on.
pub fn stream<Q, A, F, Fut>(
    req: Request<Streaming<Q>>,
    lifecycle: &Lifecycle,
    frame: StreamFrame,
    handle: F,
) -> Result<Response<crate::stream::ResponseStream<A::Streamed>>, Status>
where
    Q: InferRequest,
    A: InferAnswer,
    F: Fn(Call<Q>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<A, Status>> + Send + 'static,
{
    lifecycle.admit().map_err(Status::from)?;
    // The stream's own deadline bounds every message; a message's `timeout` may be sooner.
    let stream_deadline = crate::deadline::deadline(req.metadata(), None, Instant::now());
    // Every message is a span of its own under the context the stream was opened with.
    let parent = trace::incoming(req.metadata());
    let caller = auth::caller(&req);
    let mesh = frame.mesh_parameters;
    let handle = std::sync::Arc::new(handle);
    // A sequence's messages are handled one after another, in the order they came.
    let gates = crate::sequence::Turnstile::default();
    Ok(Response::new(crate::stream::serve(
        req.into_inner(),
        crate::stream::Options {
            max_in_flight: frame.max_in_flight,
            cancels: mesh,
            replies: Some(frame.replies),
            caller,
        },
        move |m, caller| {
            let cx = match mesh {
                true => trace::from_parameters(m.parameters()).unwrap_or_else(|| parent.clone()),
                false => parent.clone(),
            };
            let (span, carry) = trace::request("ModelStreamInfer", m.model_name(), cx);
            let handle = handle.clone();
            let deadline =
                crate::deadline::of_request(stream_deadline, m.parameters(), Instant::now());
            // Taken now, as the message is read; a malformed id is the handler's to refuse.
            let mut ticket = crate::sequence::of(m.parameters())
                .ok()
                .flatten()
                .map(|seq| gates.ticket(m.model_name(), &seq.key));
            async move {
                if let Some(ticket) = &mut ticket {
                    ticket.turn().await;
                }
                let model = m.model_name().to_string();
                let call = Call {
                    req: m,
                    deadline,
                    carry,
                    caller: caller.clone(),
                };
                let answer = auth::infer(caller.as_ref(), &model, handle(call)).await;
                drop(ticket);
                answer
            }
            .instrument(span)
        },
    )))
}
