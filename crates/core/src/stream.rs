//! ModelStreamInfer, shared by worker and gateway: every message is handled as soon as it
//! arrives (several in flight at once, so they can share batches or spread over workers);
//! responses go back in request order unless a message sets `infermesh_unordered: true`,
//! which lets it be answered as soon as it is done. A bad message is answered with
//! `error_message` (its id, and its status code in `infermesh_status_code`) while the
//! stream goes on. When the client goes away, the work in flight is dropped, which
//! cancels it downstream.
//!
//! A message with `infermesh_cancel: true` cancels the unordered message in flight with
//! the same id (answered CANCELLED, skipped if not run yet) and gets no answer itself:
//! that is how the gateway, which sends many callers' requests over one stream, passes
//! on one caller's cancel or deadline.

use std::{collections::HashMap, future::Future, pin::Pin};

use futures::{
    future::{AbortHandle, Abortable, BoxFuture},
    stream::{FuturesOrdered, FuturesUnordered},
    Stream, StreamExt,
};
use infermesh_proto as pb;
use pb::infer_parameter::ParameterChoice;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::raw::{InferAnswer, InferRequest};

/// Response parameter of a failed stream message: its gRPC status code, as a number.
pub const STATUS_CODE: &str = "infermesh_status_code";

/// Request parameter: answer this message as soon as it is done, not in request order.
pub const UNORDERED: &str = "infermesh_unordered";

/// Request parameter: cancel the unordered message in flight with this message's id.
pub const CANCEL: &str = "infermesh_cancel";

pub type ResponseStream<M = pb::ModelStreamInferResponse> =
    Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

type Answer<M> = BoxFuture<'static, M>;
/// An unordered answer, with the id and sequence number it is cancellable under.
type Keyed<M> = BoxFuture<'static, (Option<(String, u64)>, M)>;

/// How a server serves its streams.
#[derive(Clone, Debug)]
pub struct Options {
    /// Messages of one stream handled at once; beyond it the stream stops reading
    /// (back-pressure through HTTP/2 flow control).
    pub max_in_flight: usize,
    /// Whether `infermesh_cancel` messages cancel (a worker). A gateway passes them to
    /// `handle`, which refuses them: there, clients may not set mesh parameters.
    pub cancels: bool,
    /// The process's byte budget: each answer counts against it until the client's flow
    /// control lets it be written, so replies nobody reads hold back new requests rather
    /// than memory.
    pub replies: Option<crate::admission::ByteBudget>,
    /// Who opened the stream (with `--auth-config`): the credential is checked again
    /// before each message, and the stream ends with UNAUTHENTICATED once it is revoked
    /// or expired; each message is handled as the tenant the credential names then.
    pub caller: Option<crate::auth::Caller>,
}

/// Serves one stream. `handle` answers one message, as the caller given.
pub fn serve<Q, A, F, Fut>(
    mut inbound: Streaming<Q>,
    options: Options,
    handle: F,
) -> ResponseStream<A::Streamed>
where
    Q: InferRequest,
    A: InferAnswer,
    F: Fn(Q, Option<crate::auth::Caller>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<A, Status>> + Send + 'static,
{
    let max_in_flight = options.max_in_flight.max(1);
    let cancels = options.cancels;
    let replies = options.replies;
    let mut caller = options.caller;
    // The stream's end status is boxed in the queue: every slot is the size of its item.
    let (tx, rx) = mpsc::channel::<(Result<A::Streamed, Box<Status>>, _)>(max_in_flight);
    tokio::spawn(async move {
        let mut ordered: FuturesOrdered<Answer<A::Streamed>> = FuturesOrdered::new();
        let mut unordered: FuturesUnordered<Keyed<A::Streamed>> = FuturesUnordered::new();
        // Unordered messages in flight by id; the sequence number tells a reused id apart.
        let mut cancellable: HashMap<String, (u64, AbortHandle)> = HashMap::new();
        let mut seq = 0u64;
        let mut reading = true;
        let mut broken: Option<Status> = None;
        loop {
            let in_flight = ordered.len() + unordered.len();
            if !reading && in_flight == 0 {
                break;
            }
            let out = tokio::select! {
                msg = inbound.message(), if reading && in_flight < max_in_flight => match msg {
                    Ok(Some(req)) if cancels && flag(&req, CANCEL) => {
                        if let Some((_, abort)) = cancellable.remove(req.id()) {
                            abort.abort();
                        }
                        continue;
                    }
                    Ok(Some(req)) => {
                        if let Some(Err(status)) = caller.as_mut().map(crate::auth::Caller::refresh) {
                            // The credential is gone: no more messages; answer those in
                            // flight, then end the stream with why.
                            reading = false;
                            broken = Some(status);
                            continue;
                        }
                        let (id, model_name, model_version) = (
                            req.id().to_string(),
                            req.model_name().to_string(),
                            req.model_version().to_string(),
                        );
                        let failed = move |status: Status| failure(status, model_name, model_version, id);
                        if !flag(&req, UNORDERED) {
                            // Boxed where it is made: the handler's future is kilobytes,
                            // and every wrapper would otherwise copy it.
                            let fut = crate::panic::contain(Box::pin(handle(req, caller.clone())));
                            ordered.push_back(Box::pin(async move { answer(fut.await, failed) }));
                            continue;
                        }
                        seq += 1;
                        let key = (!req.id().is_empty()).then(|| (req.id().to_string(), seq));
                        let (abort, registration) = AbortHandle::new_pair();
                        if let Some((id, n)) = &key {
                            cancellable.insert(id.clone(), (*n, abort));
                        }
                        let started = Started::default();
                        let handled = Box::pin(handle(req, caller.clone()));
                        let fut = Abortable::new(STARTED.scope(started.clone(), crate::panic::contain(handled)), registration);
                        unordered.push(Box::pin(async move {
                            let result = fut.await.unwrap_or_else(|_| Err(started.cancelled()));
                            (key, answer(result, failed))
                        }));
                        continue;
                    }
                    Ok(None) => { reading = false; continue; }
                    Err(status) => {
                        // The transport broke or a message was undecodable (e.g. over the
                        // size limit): stop reading, answer what is in flight, then end the
                        // stream with that status.
                        reading = false;
                        broken = Some(status);
                        continue;
                    }
                },
                Some(resp) = ordered.next(), if !ordered.is_empty() => resp,
                Some((key, resp)) = unordered.next(), if !unordered.is_empty() => {
                    if let Some((id, n)) = key {
                        if cancellable.get(&id).is_some_and(|(m, _)| *m == n) {
                            cancellable.remove(&id);
                        }
                    }
                    resp
                }
                () = tx.closed() => return,
            };
            let held = replies.as_ref().map(|b| b.force(A::streamed_len(&out)));
            if tx.send((Ok(out), held)).await.is_err() {
                return;
            }
        }
        if let Some(status) = broken {
            let _ = tx.send((Err(Box::new(status)), None)).await;
        }
    });
    // An answer's bytes are released when tonic takes it to write, which hyper does only
    // when the client's window has room.
    Box::pin(ReceiverStream::new(rx).map(|(answer, _held)| answer.map_err(|e| *e)))
}

fn answer<A: InferAnswer>(
    result: Result<A, Status>,
    failed: impl FnOnce(Status) -> pb::ModelStreamInferResponse,
) -> A::Streamed {
    match result {
        Ok(resp) => resp.streamed(),
        Err(status) => A::failed(failed(status)),
    }
}

tokio::task_local! {
    /// The mark of the stream request being handled (see [`Started`]).
    static STARTED: Started;
}

/// Whether work on a cancellable stream request has started on an instance: its cancel
/// answer then says `cancelled-after-run` (the work was done for nothing) rather than
/// `cancelled-before-run`, which hedging and fault handling count apart.
#[derive(Clone, Default)]
pub struct Started(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Started {
    /// The mark of the stream request this task is handling, if any.
    pub fn current() -> Option<Started> {
        STARTED.try_with(Started::clone).ok()
    }

    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn cancelled(&self) -> Status {
        let reason = match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            true => crate::Reason::CancelledAfterRun,
            false => crate::Reason::CancelledBeforeRun,
        };
        crate::reason::status(tonic::Code::Cancelled, "cancelled by the client", reason)
    }
}

/// A failed message's answer: the id tells the client which request failed, and the
/// parameters its status code and reason (the message is only text).
fn failure(
    status: Status,
    model_name: String,
    model_version: String,
    id: String,
) -> pb::ModelStreamInferResponse {
    let code = pb::InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(status.code() as i64)),
    };
    let reason = crate::reason::of_status(&status).unwrap_or(crate::Reason::of_code(status.code()));
    let reason = pb::InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(reason.as_str().into())),
    };
    pb::ModelStreamInferResponse {
        error_message: crate::text::cap_message(status.message().to_string()),
        infer_response: Some(pb::ModelInferResponse {
            model_name,
            model_version,
            id,
            parameters: [
                (STATUS_CODE.to_string(), code),
                (crate::reason::PARAM.to_string(), reason),
            ]
            .into(),
            ..Default::default()
        }),
    }
}

fn flag(req: &impl InferRequest, name: &str) -> bool {
    matches!(
        req.parameters()
            .get(name)
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    )
}
