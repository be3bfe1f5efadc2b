//! Inference requests travel on to workers over long-lived ModelStreamInfer streams: a
//! message on an open stream costs a worker about two thirds of a unary call (no HTTP/2
//! stream, headers or handler task of its own) and goes out in one write, where a unary
//! call's headers and body go in two.
//!
//! - A client's stream gets one upstream stream per worker, opened by the first message
//!   the balancer sends there; they end with the client's, so a client that goes away
//!   cancels its queued work on the workers.
//! - Unary requests to a worker share one stream. A caller that cancels, or whose deadline
//!   passes, sends a cancel for its message (`infermesh_cancel`); the deadline also goes
//!   with the message as Triton's `timeout`, so an expired request never runs.
//!
//! Requests over 256 KiB, and any for which a worker has no room for another stream,
//! go as unary calls.
//!
//! Each message goes out with an id of the gateway's and `infermesh_unordered`, so its
//! answer comes back as soon as it is done and finds its caller by that id; the client's
//! own id is put back. A failed message's status code comes back in the worker's
//! `infermesh_status_code` parameter, so retries and metrics see codes, not just text.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use infermesh_core::stream::{CANCEL, STATUS_CODE, UNORDERED};
use infermesh_proto as pb;
use pb::infer_parameter::ParameterChoice;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status};

use crate::endpoint::Endpoint;

/// Upstream streams open to one worker at most, over all client streams: well under the
/// 200 concurrent HTTP/2 streams a worker's connection allows by default, so unary calls
/// always find room. Client streams beyond it send unary calls to that worker.
pub const MAX_PER_WORKER: usize = 100;

/// Larger requests go as unary calls: on a stream, a message waits for the one before
/// it to be sent in full, where HTTP/2 interleaves separate calls.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// How often an upstream stream checks whether it is idle: one with nothing in flight is
/// closed when its worker has left the rotation or it carried nothing since the last check
/// (a draining worker must not wait for its drain timeout on a stream nobody uses; the
/// next message opens a new one).
const IDLE_CHECK: Duration = Duration::from_secs(1);

type Answer = Result<pb::ModelInferResponse, Status>;

/// The upstream streams of one client stream, by worker address.
#[derive(Default)]
pub struct Upstreams {
    open: Mutex<HashMap<String, Arc<Upstream>>>,
}

pub struct Upstream {
    tx: mpsc::UnboundedSender<pb::ModelInferRequest>,
    state: Arc<Mutex<State>>,
    reader: tokio::task::AbortHandle,
}

#[derive(Default)]
struct State {
    next: u64,
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
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

/// Counts one worker's upstream streams (held by the stream's reader task).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PER_WORKER).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Upstream {
    fn open(ep: &Arc<Endpoint>, slot: Slot) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State::default()));
        let reader = tokio::spawn(read(ep.clone(), rx, state.clone(), slot)).abort_handle();
        Arc::new(Self { tx, state, reader })
    }

    fn is_closed(&self) -> bool {
        self.state.lock().expect("upstream lock").closed
    }

    fn in_flight(&self) -> usize {
        self.state.lock().expect("upstream lock").waiting.len()
    }

    /// Sends `req` under an id of ours; hands it back if the stream has ended (boxed:
    /// the rare path).
    fn send(
        self: &Arc<Self>,
        mut req: pb::ModelInferRequest,
    ) -> Result<Sent, Box<pb::ModelInferRequest>> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.state.lock().expect("upstream lock");
            if state.closed {
                return Err(Box::new(req));
            }
            state.next += 1;
            state.used = true;
            let id = state.next;
            state.waiting.insert(id, tx);
            id
        };
        let client_id = std::mem::replace(&mut req.id, id.to_string());
        req.parameters.insert(UNORDERED.into(), bool_param(true));
        let sent = Sent {
            up: self.clone(),
            id,
            client_id,
            rx,
        };
        // A failed send means the call is over: the reader fails every caller.
        let _ = self.tx.send(req);
        Ok(sent)
    }
}

/// A message sent and not yet answered. Dropped before its answer (the caller cancelled
/// or its deadline passed), it tells the worker to cancel it.
struct Sent {
    up: Arc<Upstream>,
    id: u64,
    client_id: String,
    rx: oneshot::Receiver<Answer>,
}

impl Sent {
    async fn answer(mut self, worker: &str) -> Answer {
        let answer = (&mut self.rx).await.unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "worker {worker}: stream closed"
            )))
        });
        answer.map(|mut resp| {
            resp.id = std::mem::take(&mut self.client_id);
            resp
        })
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        let mut state = self.up.state.lock().expect("upstream lock");
        if state.waiting.remove(&self.id).is_some() && !state.closed {
            let cancel = pb::ModelInferRequest {
                id: self.id.to_string(),
                parameters: [(CANCEL.to_string(), bool_param(true))].into(),
                ..Default::default()
            };
            let _ = self.up.tx.send(cancel);
        }
    }
}

/// Unary requests to one worker share one upstream stream; past this many in flight on
/// it they go as unary calls (a worker reads at most 256 messages of a stream at once).
const MAX_SHARED_IN_FLIGHT: usize = 192;

/// Sends a unary request over the stream unary requests to `ep` share, answering
/// DEADLINE_EXCEEDED at `deadline` (the worker gets the deadline as Triton's `timeout`
/// and is told to cancel). Hands the request back when there is no room: send it unary.
pub async fn shared(
    ep: &Arc<Endpoint>,
    mut req: pb::ModelInferRequest,
    deadline: Option<Instant>,
) -> Result<Answer, pb::ModelInferRequest> {
    let up = {
        let mut shared = ep.shared_stream.lock().expect("shared stream lock");
        match &*shared {
            Some(up) if !up.is_closed() => up.clone(),
            _ => {
                let Some(slot) = Slot::take(&ep.upstream_streams) else {
                    return Err(req);
                };
                let up = Upstream::open(ep, slot);
                *shared = Some(up.clone());
                up
            }
        }
    };
    if up.in_flight() >= MAX_SHARED_IN_FLIGHT {
        return Err(req);
    }
    let Some(deadline) = deadline else {
        return match up.send(req) {
            Ok(sent) => Ok(sent.answer(&ep.addr).await),
            Err(req) => Err(*req),
        };
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(Err(Status::deadline_exceeded(
            "deadline passed before a worker answered",
        )));
    }
    set_timeout(&mut req, left);
    let sent = up.send(req).map_err(|req| *req)?;
    Ok(tokio::time::timeout(left, sent.answer(&ep.addr))
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "deadline passed while worker {} was answering",
                ep.addr
            )))
        }))
}

/// Triton's `timeout` parameter (microseconds): the sooner of the caller's and `left`.
fn set_timeout(req: &mut pb::ModelInferRequest, left: Duration) {
    let left = left.as_micros().min(i64::MAX as u128) as i64;
    let timeout = match req
        .parameters
        .get("timeout")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(t)) if *t > 0 => left.min(*t),
        Some(ParameterChoice::Uint64Param(t)) if *t > 0 => left.min(*t as i64),
        _ => left,
    };
    let param = pb::InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(timeout)),
    };
    req.parameters.insert("timeout".into(), param);
}

impl Upstreams {
    /// Sends `req` to `ep` on this client stream's upstream stream to it. Hands the
    /// request back when the worker has no room for another stream (send it unary).
    pub async fn infer(
        &self,
        ep: &Arc<Endpoint>,
        mut req: pb::ModelInferRequest,
    ) -> Result<Answer, pb::ModelInferRequest> {
        let sent = loop {
            let Some(up) = self.upstream(ep) else {
                return Err(req);
            };
            match up.send(req) {
                Ok(sent) => break sent,
                Err(back) => {
                    req = *back;
                    self.forget(&ep.addr, &up);
                }
            }
        };
        Ok(sent.answer(&ep.addr).await)
    }

    fn upstream(&self, ep: &Arc<Endpoint>) -> Option<Arc<Upstream>> {
        let mut open = self.open.lock().expect("upstreams lock");
        if let Some(up) = open.get(&ep.addr) {
            return Some(up.clone());
        }
        let up = Upstream::open(ep, Slot::take(&ep.upstream_streams)?);
        open.insert(ep.addr.clone(), up.clone());
        Some(up)
    }

    fn forget(&self, addr: &str, closed: &Arc<Upstream>) {
        let mut open = self.open.lock().expect("upstreams lock");
        if open.get(addr).is_some_and(|up| Arc::ptr_eq(up, closed)) {
            open.remove(addr);
        }
    }
}

/// Opens the stream and hands each answer to its caller; when the stream ends, fails
/// every caller still waiting with the reason (retryable when it means the worker is gone).
async fn read(
    ep: Arc<Endpoint>,
    rx: mpsc::UnboundedReceiver<pb::ModelInferRequest>,
    state: Arc<Mutex<State>>,
    _slot: Slot,
) {
    // The request side ends with this task, so the worker sees the stream end even while
    // an `Upstream` (and its sender) is still held.
    let (_ending, ended) = oneshot::channel::<()>();
    let why = pump(
        &ep,
        UnboundedReceiverStream::new(rx).take_until(ended),
        &state,
    )
    .await;
    // No caller still waiting got an answer, so each may go to another worker.
    let why = match why.code() {
        Code::Unavailable => why,
        code => Status::unavailable(format!(
            "worker {}: stream broke ({code:?}: {})",
            ep.addr,
            why.message()
        )),
    };
    let mut state = state.lock().expect("upstream lock");
    state.closed = true;
    for (_, caller) in state.waiting.drain() {
        let _ = caller.send(Err(why.clone()));
    }
}

async fn pump(
    ep: &Endpoint,
    outbound: impl Stream<Item = pb::ModelInferRequest> + Send + 'static,
    state: &Mutex<State>,
) -> Status {
    let mut client = ep.client.clone();
    let mut inbound = match client.model_stream_infer(outbound).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => return status,
    };
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => deliver(state, msg),
                Ok(None) => return Status::unavailable(format!("worker {} ended the stream", ep.addr)),
                Err(status) => return status,
            },
            _ = idle_check.tick() => {
                let mut state = state.lock().expect("upstream lock");
                let used = std::mem::take(&mut state.used);
                if state.waiting.is_empty() && (!used || !ep.is_ready()) {
                    state.closed = true;
                    return Status::unavailable(format!("worker {}: idle stream closed", ep.addr));
                }
            }
        }
    }
}

fn deliver(state: &Mutex<State>, msg: pb::ModelStreamInferResponse) {
    let Some(mut resp) = msg.infer_response else {
        return;
    };
    let Some(caller) = resp
        .id
        .parse()
        .ok()
        .and_then(|id| state.lock().expect("upstream lock").waiting.remove(&id))
    else {
        return; // its caller went away
    };
    let answer = if msg.error_message.is_empty() {
        Ok(resp)
    } else {
        let code = match resp.parameters.remove(STATUS_CODE) {
            Some(pb::InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(code)),
            }) => Code::from(code as i32),
            _ => Code::Unknown,
        };
        Err(Status::new(code, msg.error_message))
    };
    let _ = caller.send(answer);
}

fn bool_param(b: bool) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(ParameterChoice::BoolParam(b)),
    }
}
