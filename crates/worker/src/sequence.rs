//! Triton's sequence batcher for stateful models (`sequence_batching`): every request
//! carries `sequence_id` (and `sequence_start` / `sequence_end`); the worker gives it the
//! control inputs the config names (START, END, READY, CORRID) and the sequence's
//! implicit state, keeps the model's state output for the sequence's next request, and
//! lets the model's scheduler batch requests of different sequences along the batch
//! dim. A sequence holds one of the model's slots from its start to its end (or until it
//! has been idle for `max_sequence_idle_microseconds`); a new sequence beyond them waits
//! for one within its deadline, and beyond `max_queue_size` waiting is refused
//! (`sequence-slots-full`). A sequence's requests run one at a time, in order.

pub mod metrics;
pub mod policy;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use infermesh_core::{
    admission::{ByteBudget, BytesPermit},
    sequence::{Id, Sequence},
    DataType, Error as RequestError, Reason, Tensor, TensorData,
};
use infermesh_proto::model_sequence_batching::control::Kind;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use self::{metrics::SequenceMetrics, policy::Policy};
use crate::{metrics::ModelLabels, Error};

/// The sequences of one loaded model version.
pub struct Sequences {
    inner: Arc<Inner>,
}

struct Inner {
    model: String,
    policy: Policy,
    table: Mutex<HashMap<String, Arc<Entry>>>,
    slots: Arc<Semaphore>,
    /// New sequences that may wait for a slot at once.
    backlog: usize,
    budget: ByteBudget,
    metrics: SequenceMetrics,
    labels: ModelLabels,
    waiting: Gauge,
}

struct Entry {
    /// None before its start has a slot, and once the sequence ended or was released;
    /// locked while a request runs (or its start waits for a slot), so a sequence's
    /// requests run one at a time, in the order they came.
    live: Arc<tokio::sync::Mutex<Option<Live>>>,
    /// When its last request arrived (Triton's idle clock).
    last: Mutex<Instant>,
}

type Turn = tokio::sync::OwnedMutexGuard<Option<Live>>;

/// An active sequence: its slot and its state.
struct Live {
    states: Vec<Tensor>,
    /// Whether a request has run on it since its start (a start on a used sequence
    /// restarts it).
    used: bool,
    held: BytesPermit,
    _slot: OwnedSemaphorePermit,
    active: Gauge,
    bytes: Gauge,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.active.dec();
        self.bytes.dec_by(self.held.bytes() as i64);
    }
}

impl Sequences {
    /// `backlog`: new sequences that may wait for a slot (the model's queue size);
    /// `budget`: the worker's byte budget, which state counts against.
    pub fn new(
        model: &str,
        version: i64,
        policy: Policy,
        backlog: usize,
        budget: ByteBudget,
        metrics: SequenceMetrics,
    ) -> Self {
        let labels = ModelLabels {
            model: model.into(),
            version: version.to_string(),
        };
        let waiting = metrics.waiting.get_or_create(&labels).clone();
        let inner = Arc::new(Inner {
            model: model.into(),
            slots: Arc::new(Semaphore::new(policy.slots)),
            waiting,
            policy,
            table: Mutex::default(),
            backlog,
            budget,
            metrics,
            labels,
        });
        tokio::runtime::Handle::current().spawn(reap(Arc::downgrade(&inner)));
        Self { inner }
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Sequences active now.
    pub fn active(&self) -> usize {
        self.inner.table.lock().expect("sequence table").len()
    }

    /// Runs one request of a sequence: `submit` queues the model's inputs (the client's,
    /// the controls and the state) and asks for its outputs (the client's and the state).
    pub async fn run<F, Fut>(
        &self,
        seq: Option<Sequence>,
        rows: usize,
        deadline: Option<Instant>,
        inputs: Vec<Tensor>,
        outputs: Vec<String>,
        submit: F,
    ) -> Result<Vec<Tensor>, Error>
    where
        F: FnOnce(Vec<Tensor>, Vec<String>) -> Fut,
        Fut: Future<Output = Result<Vec<Tensor>, Error>>,
    {
        let inner = &self.inner;
        let model = &inner.model;
        let Some(seq) = seq else {
            return Err(invalid(format!(
                "inference request to model '{model}' must specify a non-zero or non-empty correlation ID"
            )));
        };
        if inner.policy.batched && rows != 1 {
            return Err(invalid(format!(
                "inference request to model '{model}' must specify batch-size 1 due to requirements of sequence batcher (found {rows})"
            )));
        }
        let controls = inner.controls(&seq)?;
        let (entry, mut live) = inner.enter(&seq, deadline).await?;
        if seq.start {
            if let Err(e) = inner.begin(&mut live, &seq, deadline).await {
                inner.end(&seq.key, &entry, &mut live, "end");
                return Err(e);
            }
        }
        let Some(held) = live.as_mut() else {
            return Err(not_started(model, &seq));
        };
        let mut all = inputs;
        all.extend(controls);
        all.extend(held.states.iter().cloned());
        let mut wanted = outputs.clone();
        for s in &inner.policy.states {
            if !wanted.contains(&s.output) {
                wanted.push(s.output.clone());
            }
        }
        let result = submit(all, wanted).await;
        let result = result.and_then(|mut outs| {
            inner.keep(held, &mut outs, &outputs)?;
            Ok(outs)
        });
        if seq.end {
            inner.end(&seq.key, &entry, &mut live, "end");
        }
        result
    }
}

fn invalid(m: String) -> Error {
    RequestError::InvalidArgument(m).into()
}

fn not_started(model: &str, seq: &Sequence) -> Error {
    invalid(format!(
        "inference request for sequence {} to model '{model}' must specify the START flag on the first request of the sequence",
        seq.shown()
    ))
}

impl Inner {
    /// The sequence's entry, locked: its turn. A start of an unknown id makes the entry
    /// at once, before it has a slot, so the sequence's next requests queue behind it
    /// (Triton's backlog) rather than being refused.
    async fn enter(
        &self,
        seq: &Sequence,
        deadline: Option<Instant>,
    ) -> Result<(Arc<Entry>, Turn), Error> {
        let now = Instant::now();
        let found = self
            .table
            .lock()
            .expect("sequence table")
            .get(&seq.key)
            .cloned();
        if let Some(entry) = found {
            *entry.last.lock().expect("idle clock") = now;
            // Behind the sequence's earlier requests, within this one's deadline.
            let turn = entry.live.clone().lock_owned();
            let turn = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), turn).await.map_err(|_| {
                    RequestError::DeadlineExceeded(format!(
                        "model '{}': the deadline passed while sequence {}'s earlier requests ran; this one was not run",
                        self.model,
                        seq.shown()
                    ))
                })?,
                None => turn.await,
            };
            return Ok((entry, turn));
        }
        if !seq.start {
            return Err(not_started(&self.model, seq));
        }
        let entry = Arc::new(Entry {
            live: Default::default(),
            last: Mutex::new(now),
        });
        let turn = entry
            .live
            .clone()
            .try_lock_owned()
            .expect("a new entry is not locked");
        // Another start of the same id in between: this one replaces it in the table
        // (that one runs its request and is forgotten).
        self.table
            .lock()
            .expect("sequence table")
            .insert(seq.key.clone(), entry.clone());
        Ok((entry, turn))
    }

    /// A start on an entry: its state set to the initial one. An entry still active is a
    /// sequence id reused before its end: Triton ends the old sequence early and starts
    /// this one (with a warning); so does this worker.
    async fn begin(
        &self,
        live: &mut Option<Live>,
        seq: &Sequence,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        match live {
            Some(held) if !held.used => {}
            Some(held) => {
                tracing::warn!(model = %self.model, sequence = %seq.shown(), "sequence_start for a sequence that did not end: the previous sequence is ended early");
                self.ended("restart");
                self.replace(held, self.initial())?;
                held.used = false;
            }
            None => *live = Some(self.admit(seq, deadline).await?),
        }
        Ok(())
    }

    /// A slot and initial state for a new sequence: at once, or after waiting (within
    /// the deadline) for another sequence to end.
    async fn admit(&self, seq: &Sequence, deadline: Option<Instant>) -> Result<Live, Error> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => self.wait_for_slot(seq, deadline).await?,
        };
        let states = self.initial();
        let bytes = state_bytes(&states);
        let held = self.budget.acquire(bytes).map_err(|_| {
            RequestError::ResourceExhausted(format!(
                "model '{}': sequence {} needs {bytes} bytes of state and the worker's --max-inflight-bytes is taken",
                self.model,
                seq.shown()
            ))
            .because(Reason::OverBudget)
        })?;
        let active = self.metrics.active.get_or_create(&self.labels).clone();
        let gauge = self.metrics.state_bytes.get_or_create(&self.labels).clone();
        active.inc();
        gauge.inc_by(bytes as i64);
        Ok(Live {
            states,
            used: false,
            held,
            _slot: slot,
            active,
            bytes: gauge,
        })
    }

    async fn wait_for_slot(
        &self,
        seq: &Sequence,
        deadline: Option<Instant>,
    ) -> Result<OwnedSemaphorePermit, Error> {
        let slots = self.policy.slots;
        if self.waiting.inc() as usize >= self.backlog {
            self.waiting.dec();
            return Err(RequestError::ResourceExhausted(format!(
                "model '{}': all {slots} sequence slots are taken and {} new sequences already wait for one (max_queue_size); sequence {} was not started",
                self.model,
                self.backlog,
                seq.shown()
            ))
            .because(Reason::SequenceSlotsFull)
            .into());
        }
        let waited = Instant::now();
        let acquire = self.slots.clone().acquire_owned();
        let got = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), acquire).await.ok(),
            None => Some(acquire.await),
        };
        self.waiting.dec();
        match got {
            Some(slot) => Ok(slot.expect("slots never closed")),
            None => Err(RequestError::DeadlineExceeded(format!(
                "model '{}': sequence {} waited {:?} for one of the {slots} sequence slots and its deadline passed; it was not started",
                self.model,
                seq.shown(),
                waited.elapsed()
            ))
            .into()),
        }
    }

    fn initial(&self) -> Vec<Tensor> {
        self.policy
            .states
            .iter()
            .map(|s| s.initial.clone())
            .collect()
    }

    /// The control tensors for this request of `seq`.
    fn controls(&self, seq: &Sequence) -> Result<Vec<Tensor>, Error> {
        self.policy
            .controls
            .iter()
            .map(|c| {
                let flag = |on: bool| TensorData::Fixed(c.false_true[on as usize].clone());
                let data = match c.kind {
                    Kind::ControlSequenceStart => flag(seq.start),
                    Kind::ControlSequenceEnd => flag(seq.end),
                    Kind::ControlSequenceReady => flag(true),
                    Kind::ControlSequenceCorrid => corrid(&self.model, c, &seq.id)?,
                };
                Ok(Tensor {
                    name: c.input.clone(),
                    datatype: c.datatype,
                    shape: c.shape.clone(),
                    data,
                })
            })
            .collect()
    }

    /// Keeps the model's state outputs as the sequence's state (in buffers of their own,
    /// counted against the byte budget), and leaves in `outs` only what was asked.
    fn keep(&self, held: &mut Live, outs: &mut Vec<Tensor>, asked: &[String]) -> Result<(), Error> {
        let mut next = Vec::with_capacity(self.policy.states.len());
        for s in &self.policy.states {
            let out = outs.iter().find(|t| t.name == s.output).ok_or_else(|| {
                Error::Runtime(format!("the model gave no state output '{}'", s.output))
            })?;
            let TensorData::Fixed(data) = &out.data else {
                return Err(Error::Runtime(format!(
                    "state output '{}' is not a fixed-size tensor",
                    s.output
                )));
            };
            next.push(Tensor {
                name: s.input.clone(),
                datatype: s.datatype,
                shape: out.shape.clone(),
                data: TensorData::Fixed(Bytes::copy_from_slice(data)),
            });
        }
        self.replace(held, next)?;
        held.used = true;
        outs.retain(|t| asked.contains(&t.name));
        Ok(())
    }

    /// Makes `next` the sequence's state, its bytes counted.
    fn replace(&self, held: &mut Live, next: Vec<Tensor>) -> Result<(), Error> {
        let bytes = state_bytes(&next);
        let now = held.held.bytes();
        if bytes > now {
            let more = self.budget.acquire(bytes - now).map_err(|_| {
                RequestError::ResourceExhausted(format!(
                    "model '{}': the sequence's state grew to {bytes} bytes and the worker's --max-inflight-bytes is taken",
                    self.model
                ))
                .because(Reason::OverBudget)
            })?;
            held.held.absorb(more);
        } else if bytes < now {
            drop(held.held.split_off(now - bytes));
        }
        held.bytes.inc_by(bytes as i64 - now as i64);
        held.states = next;
        Ok(())
    }

    /// The sequence is over: its slot and state freed, its id forgotten.
    fn end(&self, key: &str, entry: &Arc<Entry>, live: &mut Option<Live>, how: &str) {
        if live.take().is_some() {
            self.ended(how);
        }
        let mut table = self.table.lock().expect("sequence table");
        if table.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            table.remove(key);
        }
    }

    fn ended(&self, how: &str) {
        self.metrics
            .ended
            .get_or_create(&metrics::EndLabels {
                model: self.labels.model.clone(),
                version: self.labels.version.clone(),
                how: how.into(),
            })
            .inc();
    }

    /// Releases sequences idle longer than `max_sequence_idle_microseconds` (not one with
    /// a request running).
    fn reap(&self) {
        let now = Instant::now();
        let idle = self.policy.idle;
        let mut released = 0;
        self.table
            .lock()
            .expect("sequence table")
            .retain(|_, entry| {
                let last = *entry.last.lock().expect("idle clock");
                if now.duration_since(last) < idle {
                    return true;
                }
                let Ok(mut live) = entry.live.try_lock() else {
                    return true;
                };
                if live.take().is_some() {
                    released += 1;
                }
                false
            });
        for _ in 0..released {
            self.ended("idle");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let open = self.table.get_mut().expect("sequence table").len();
        for _ in 0..open {
            self.ended("unload");
        }
    }
}

/// Checks for idle sequences often enough that one is released within an eighth of the
/// idle time after it passes; ends with the model.
async fn reap(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.policy.idle / 8).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match inner.upgrade() {
            Some(inner) => inner.reap(),
            None => return,
        }
    }
}

fn state_bytes(states: &[Tensor]) -> usize {
    states
        .iter()
        .map(|t| match &t.data {
            TensorData::Fixed(b) => b.len(),
            TensorData::Strings(s) => s.iter().map(Bytes::len).sum(),
        })
        .sum()
}

/// The CORRID control's value: the id in the control's data type (32-bit types keep the
/// low 32 bits, as Triton does; a string control gets an integer id as its digits).
fn corrid(model: &str, c: &policy::Control, id: &Id) -> Result<TensorData, Error> {
    let n = match id {
        Id::Int(n) => *n,
        Id::Text(s) if c.datatype == DataType::Bytes => {
            return Ok(TensorData::Strings(vec![Bytes::copy_from_slice(s.as_bytes())]))
        }
        Id::Text(_) => {
            return Err(invalid(format!(
                "parameter 'sequence_id': model '{model}' takes integer sequence ids (its CONTROL_SEQUENCE_CORRID input '{}' is {}), found a string",
                c.input,
                c.datatype.as_str()
            )))
        }
    };
    let bytes: Vec<u8> = match c.datatype {
        DataType::U64 | DataType::I64 => n.to_le_bytes().to_vec(),
        DataType::U32 | DataType::I32 => (n as u32).to_le_bytes().to_vec(),
        _ => return Ok(TensorData::Strings(vec![Bytes::from(n.to_string())])),
    };
    Ok(TensorData::Fixed(bytes.into()))
}
