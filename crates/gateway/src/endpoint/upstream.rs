//! Inference requests travel on to workers over long-lived ModelStreamInfer streams: a
//! message on an open stream costs a worker about two thirds of a unary call (no HTTP/2
//! stream, headers or handler task of its own) and goes out in one write, where a unary
//! call's headers and body go in two.
//!
//! Every request to a worker, unary or a client's stream message, goes on one of a few
//! streams the gateway keeps open to it ([`attempt`]). A caller that goes away (a cancel, a
//! closed client stream) or whose deadline passes sends a cancel for its message
//! (`infermesh_cancel`), so the worker skips it if it has not run; the deadline also goes
//! with the message as Triton's `timeout`. Requests over 256 KiB, and requests past 192 in
//! flight on every stream to a worker, go as unary calls.
//!
//! Each message goes out with an id of the gateway's and `infermesh_unordered`, so its
//! answer comes back as soon as it is done and finds its caller by that id; the client's
//! own id is put back. The request is encoded straight from the caller's copy, shared by
//! every attempt, with the gateway's fields after it (`wire`). A failed message's status code comes back in the worker's
//! `infermesh_status_code` parameter, so retries and metrics see codes, not just text.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::uri::PathAndQuery;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use infermesh_core::{
    raw::{RawAnswer, RawRequest},
    reason, trace, Reason,
};
use infermesh_proto as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status};
use tracing::Instrument;

use super::{
    wire::{self, Delivered, Outgoing},
    Endpoint,
};
use crate::{failure::unreachable, metrics::OpenGauge};

/// Streams open to one worker at most. One carries all traffic while it has fewer than
/// `SPREAD` in flight; more streams spread a busy worker's reading over its threads.
const MAX_STREAMS: usize = 4;
const SPREAD: usize = 32;

/// Messages in flight on one stream at most (a worker reads at most 256 of a stream at
/// once): past it on every stream, requests go as unary calls.
const MAX_IN_FLIGHT: usize = 192;

/// Larger requests go as unary calls: on a stream, a message waits for the one before
/// it to be sent in full, where HTTP/2 interleaves separate calls.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// How often an upstream stream checks whether it is idle: one with nothing in flight is
/// closed when its worker has left the rotation or it carried nothing since the last check
/// (a draining worker must not wait for its drain timeout on a stream nobody uses; the
/// next message opens a new one).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// An attempt's answer: the worker's bytes, to go out under the client's id.
type Answer = Result<RawAnswer, Status>;
/// What a stream's reader hands a caller: the answer's bytes as the worker sent them.
type Reply = Result<Bytes, Status>;

pub struct Upstream {
    tx: mpsc::UnboundedSender<Outgoing>,
    state: Arc<Mutex<State>>,
    reader: tokio::task::AbortHandle,
}

#[derive(Default)]
struct State {
    next: u64,
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// The stream has ended: messages go on a new one.
    closed: bool,
    /// A message went out since the last idle check.
    used: bool,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Drops the call, which resets the worker's stream: queued messages never run.
        self.reader.abort();
    }
}

impl Upstream {
    fn open(ep: &Arc<Endpoint>) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State::default()));
        let reader = tokio::spawn(read(ep.clone(), rx, state.clone())).abort_handle();
        Arc::new(Self { tx, state, reader })
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("upstream lock").closed
    }

    fn in_flight(&self) -> usize {
        self.state.lock().expect("upstream lock").waiting.len()
    }

    /// Sends `req` at `version` under an id of ours; `None` if the stream has ended.
    fn send(
        self: &Arc<Self>,
        req: &Arc<RawRequest>,
        version: i64,
        timeout: Option<i64>,
        trace: HashMap<String, pb::InferParameter>,
    ) -> Option<Sent> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.state.lock().expect("upstream lock");
            if state.closed {
                return None;
            }
            state.next += 1;
            state.used = true;
            let id = state.next;
            state.waiting.insert(id, tx);
            id
        };
        let sent = Sent {
            up: self.clone(),
            id,
            rx,
        };
        // A failed send means the call is over: the reader fails every caller.
        let _ = self.tx.send(Outgoing::Request {
            req: req.clone(),
            id,
            version,
            timeout,
            trace,
        });
        Some(sent)
    }
}

/// A message sent and not yet answered. Dropped before its answer (the caller cancelled
/// or its deadline passed), it tells the worker to cancel it.
struct Sent {
    up: Arc<Upstream>,
    id: u64,
    rx: oneshot::Receiver<Reply>,
}

impl Sent {
    async fn answer(mut self, worker: &str) -> Reply {
        (&mut self.rx)
            .await
            .unwrap_or_else(|_| Err(unreachable(format!("worker {worker}: stream closed"))))
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        let mut state = self.up.state.lock().expect("upstream lock");
        if state.waiting.remove(&self.id).is_some() && !state.closed {
            let _ = self.up.tx.send(Outgoing::Cancel(self.id));
        }
    }
}

/// One attempt of `req` at `version` on `ep`, bounded by `left`: the one place that
/// chooses between one of its streams and a unary call (a message over MAX_MESSAGE_BYTES,
/// or every stream full). The trace context goes where the chosen way carries it: a stream
/// message's parameters, a unary call's metadata.
pub async fn attempt(
    ep: &Arc<Endpoint>,
    req: &Arc<RawRequest>,
    version: i64,
    size: usize,
    left: Option<Duration>,
    carry: &trace::Carry,
    span: tracing::Span,
) -> Answer {
    if size <= MAX_MESSAGE_BYTES {
        let sent = send(ep, req, version, left, carry, &span);
        if let Some(answer) = sent.instrument(span.clone()).await {
            // Out under the client's own id, in place of ours.
            return answer.map(|bytes| RawAnswer {
                bytes,
                id: req.id.clone(),
            });
        }
    }
    // Boxed: a unary call's future is kilobytes, and inline it would make every
    // request's future (the stream messages' too) that large.
    Box::pin(unary(ep, req, version, left, carry, span)).await
}

/// One attempt as a unary call, bounded by `left`.
async fn unary(
    ep: &Endpoint,
    req: &Arc<RawRequest>,
    version: i64,
    left: Option<Duration>,
    carry: &trace::Carry,
    span: tracing::Span,
) -> Answer {
    let mut call = tonic::Request::new(Outgoing::Unary {
        req: req.clone(),
        version,
    });
    if let Some(left) = left {
        call.set_timeout(left);
    }
    carry.inject(&span, call.metadata_mut());
    let mut grpc = client(ep);
    ready(&mut grpc).await?;
    let path = PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
    let resp = grpc
        .unary(call, path, wire::Codec::<Bytes>::default())
        .instrument(span)
        .await?;
    Ok(RawAnswer {
        bytes: resp.into_inner(),
        id: req.id.clone(),
    })
}

/// Sends `req` to `ep` over one of the streams kept open to it, answering
/// DEADLINE_EXCEEDED once `left` has passed; the worker is told `left` as Triton's
/// `timeout` (what is left of the deadline, which already holds the request's own).
/// `None` when every stream is full: send it as a unary call.
async fn send(
    ep: &Arc<Endpoint>,
    req: &Arc<RawRequest>,
    version: i64,
    left: Option<Duration>,
    carry: &trace::Carry,
    span: &tracing::Span,
) -> Option<Reply> {
    let up = pick(ep)?;
    let timeout = left.map(|left| left.as_micros().min(i64::MAX as u128) as i64);
    let mut trace = HashMap::new();
    carry.inject_parameters(span, &mut trace);
    // The stream closed between the pick and the send (rare): a unary call instead.
    let sent = up.send(req, version, timeout, trace)?;
    let answer = sent.answer(&ep.addr);
    let Some(left) = left else {
        return Some(answer.await);
    };
    Some(
        tokio::time::timeout(left, answer)
            .await
            .unwrap_or_else(|_| {
                Err(reason::status(
                    Code::DeadlineExceeded,
                    format!("deadline passed while worker {} was answering", ep.addr),
                    Reason::Deadline,
                ))
            }),
    )
}

/// The open stream to `ep` with the fewest in flight, opening another while all are busy.
fn pick(ep: &Arc<Endpoint>) -> Option<Arc<Upstream>> {
    let mut streams = ep.streams.lock().expect("streams lock");
    streams.retain(|up| !up.is_closed());
    let least = streams
        .iter()
        .map(|up| (up.in_flight(), up))
        .min_by_key(|(n, _)| *n);
    match least {
        Some((n, up)) if n < SPREAD || streams.len() == MAX_STREAMS => {
            (n < MAX_IN_FLIGHT).then(|| up.clone())
        }
        _ => {
            let up = Upstream::open(ep);
            streams.push(up.clone());
            Some(up)
        }
    }
}

/// Opens the stream and hands each answer to its caller; when the stream ends, fails
/// every caller still waiting with the reason (retryable when it means the worker is gone).
async fn read(ep: Arc<Endpoint>, rx: mpsc::UnboundedReceiver<Outgoing>, state: Arc<Mutex<State>>) {
    let _open = OpenGauge::new(&ep.metrics.streams);
    // The request side ends with this task, so the worker sees the stream end even while
    // an `Upstream` (and its sender) is still held.
    let (_ending, ended) = oneshot::channel::<()>();
    let (why, broke) = pump(
        &ep,
        UnboundedReceiverStream::new(rx).take_until(ended),
        &state,
    )
    .await;
    // No caller still waiting got an answer, so each may go to another worker. A worker's
    // own refusal keeps its reason (a size or draining refusal); a broken connection keeps
    // its transport error (the gateway tells the client `worker-unreachable` when it gives
    // up); any other ending is ours to name.
    let keep = reason::of_status(&why).is_some()
        || why.code() == Code::ResourceExhausted
        || crate::failure::transport(&why);
    let mut why = if keep {
        why
    } else if why.code() == Code::Unavailable {
        unreachable(why.message().to_string())
    } else {
        unreachable(format!(
            "worker {}: stream broke ({:?}: {})",
            ep.addr,
            why.code(),
            why.message()
        ))
    };
    if broke {
        why.set_source(Arc::new(crate::poison::WorkerBroke));
    }
    let mut state = state.lock().expect("upstream lock");
    state.closed = true;
    for (_, caller) in state.waiting.drain() {
        let _ = caller.send(Err(why.clone()));
    }
}

/// Runs the stream until it ends; says why, and whether it broke while open (the
/// worker's connection failed under messages already sent) rather than ended.
async fn pump(
    ep: &Endpoint,
    outbound: impl Stream<Item = Outgoing> + Send + 'static,
    state: &Mutex<State>,
) -> (Status, bool) {
    let mut inbound = match open(ep, outbound).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return (status, false),
    };
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => deliver(state, msg),
                Ok(None) => return (unreachable(format!("worker {} ended the stream", ep.addr)), false),
                // A status the worker sent (its trailers) is an answer, not a break; a
                // failure of the connection itself carries its h2/hyper error as source.
                Err(status) => {
                    let broke = std::error::Error::source(&status).is_some();
                    return (status, broke);
                }
            },
            _ = idle_check.tick() => {
                let mut state = state.lock().expect("upstream lock");
                let used = std::mem::take(&mut state.used);
                if state.waiting.is_empty() && (!used || !ep.is_ready()) {
                    state.closed = true;
                    return (unreachable(format!("worker {}: idle stream closed", ep.addr)), false);
                }
            }
        }
    }
}

/// A call to `ep` with the gateway's codec (`wire`), as the generated client makes one
/// with prost's.
fn client(ep: &Endpoint) -> tonic::client::Grpc<tonic::transport::Channel> {
    tonic::client::Grpc::new(ep.channel.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

async fn ready(grpc: &mut tonic::client::Grpc<tonic::transport::Channel>) -> Result<(), Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))
}

/// Opens ModelStreamInfer on `ep`.
async fn open(
    ep: &Endpoint,
    outbound: impl Stream<Item = Outgoing> + Send + 'static,
) -> Result<tonic::Response<tonic::codec::Streaming<Delivered>>, Status> {
    let mut grpc = client(ep);
    ready(&mut grpc).await?;
    let path = PathAndQuery::from_static("/inference.GRPCInferenceService/ModelStreamInfer");
    grpc.streaming(
        tonic::Request::new(outbound),
        path,
        wire::Codec::<Delivered>::default(),
    )
    .await
}

fn deliver(state: &Mutex<State>, msg: Delivered) {
    let caller = msg
        .id
        .and_then(|id| state.lock().expect("upstream lock").waiting.remove(&id));
    if let Some(caller) = caller {
        let _ = caller.send(msg.answer);
    } // else its caller went away
}
