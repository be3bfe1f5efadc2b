//! A client's ModelStreamInfer messages travel on to workers over streams too: one
//! upstream stream per worker per client stream, opened by the first message the balancer
//! sends there. A stream message costs a worker about two thirds of a unary call (no
//! HTTP/2 stream, headers or handler task of its own), and the upstream streams end with
//! the client's, so a client that goes away still cancels its queued work on the workers.
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
    time::Duration,
};

use infermesh_core::stream::{STATUS_CODE, UNORDERED};
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

/// How often an idle upstream stream checks that its worker is still in rotation (a
/// draining worker must not wait for its drain timeout on a stream nobody uses).
const IDLE_CHECK: Duration = Duration::from_secs(1);

type Answer = Result<pb::ModelInferResponse, Status>;

/// The upstream streams of one client stream, by worker address.
#[derive(Default)]
pub struct Upstreams {
    open: Mutex<HashMap<String, Arc<Upstream>>>,
}

struct Upstream {
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

impl Upstreams {
    /// Sends `req` to `ep` on this client stream's upstream stream to it. `None` (the
    /// request handed back) when the worker has no room for another stream: send it unary.
    pub async fn infer(
        &self,
        ep: &Arc<Endpoint>,
        mut req: pb::ModelInferRequest,
    ) -> Result<Answer, pb::ModelInferRequest> {
        let client_id = std::mem::take(&mut req.id);
        let (tx, rx) = oneshot::channel();
        let (up, id) = loop {
            let Some(up) = self.upstream(ep) else {
                req.id = client_id;
                return Err(req);
            };
            let mut state = up.state.lock().expect("upstream lock");
            if state.closed {
                drop(state);
                self.forget(&ep.addr, &up);
                continue;
            }
            let id = state.next;
            state.next += 1;
            state.waiting.insert(id, tx);
            break (up.clone(), id);
        };
        req.id = id.to_string();
        req.parameters.insert(UNORDERED.into(), bool_param(true));
        let waiting = Waiting {
            state: &up.state,
            id,
        };
        if up.tx.send(req).is_err() {
            return Ok(Err(Status::unavailable(format!(
                "worker {}: stream closed",
                ep.addr
            ))));
        }
        let answer = rx.await.unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "worker {}: stream closed",
                ep.addr
            )))
        });
        drop(waiting);
        Ok(answer.map(|mut resp| {
            resp.id = client_id;
            resp
        }))
    }

    fn upstream(&self, ep: &Arc<Endpoint>) -> Option<Arc<Upstream>> {
        let mut open = self.open.lock().expect("upstreams lock");
        if let Some(up) = open.get(&ep.addr) {
            return Some(up.clone());
        }
        let slot = Slot::take(&ep.upstream_streams)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State::default()));
        let reader = tokio::spawn(read(ep.clone(), rx, state.clone(), slot)).abort_handle();
        let up = Arc::new(Upstream { tx, state, reader });
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

/// A caller waiting for its answer; forgets the entry if the caller goes away first.
struct Waiting<'a> {
    state: &'a Mutex<State>,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.state
            .lock()
            .expect("upstream lock")
            .waiting
            .remove(&self.id);
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
    let why = pump(&ep, rx, &state).await;
    let mut state = state.lock().expect("upstream lock");
    state.closed = true;
    for (_, caller) in state.waiting.drain() {
        let _ = caller.send(Err(why.clone()));
    }
}

async fn pump(
    ep: &Endpoint,
    rx: mpsc::UnboundedReceiver<pb::ModelInferRequest>,
    state: &Mutex<State>,
) -> Status {
    let mut client = ep.client.clone();
    let mut inbound = match client
        .model_stream_infer(UnboundedReceiverStream::new(rx))
        .await
    {
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
                if state.waiting.is_empty() && !ep.is_ready() {
                    state.closed = true;
                    return Status::unavailable(format!("worker {} left the pool", ep.addr));
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
