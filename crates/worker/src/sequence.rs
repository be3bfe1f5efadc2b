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

use self::metrics::{How, ModelSequenceMetrics};
pub use self::{metrics::SequenceMetrics, policy::Policy};
use crate::Error;

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
    metrics: ModelSequenceMetrics,
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
        metrics: &SequenceMetrics,
    ) -> Self {
        let inner = Arc::new(Inner {
            model: model.into(),
            slots: Arc::new(Semaphore::new(policy.slots)),
            policy,
            table: Mutex::default(),
            backlog,
            budget,
            metrics: metrics.of(model, version),
        });
        tokio::runtime::Handle::current().spawn(reap(Arc::downgrade(&inner)));
        Self { inner }
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Sequence ids the table holds (active, or starts waiting for a slot).
    pub fn open(&self) -> usize {
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
                inner.end(&seq.key, &entry, &mut live);
                return Err(e);
            }
        }
        if live.is_none() {
            // Its start never got a slot (cancelled, or refused): forgotten.
            inner.end(&seq.key, &entry, &mut live);
            return Err(not_started(model, &seq));
        }
        let held = live.as_mut().expect("checked above");
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
            inner.end(&seq.key, &entry, &mut live);
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
                self.metrics.ended(How::Restart);
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
        let (active, gauge) = (
            self.metrics.active.clone(),
            self.metrics.state_bytes.clone(),
        );
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
        // Counted while it waits, a cancelled wait included.
        struct Waiting(Gauge);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        let waiting = Waiting(self.metrics.waiting.clone());
        if waiting.0.inc() as usize >= self.backlog {
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
        drop(waiting);
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
    fn end(&self, key: &str, entry: &Arc<Entry>, live: &mut Option<Live>) {
        if live.take().is_some() {
            self.metrics.ended(How::End);
        }
        let mut table = self.table.lock().expect("sequence table");
        if table.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            table.remove(key);
        }
    }

    /// Releases sequences idle longer than `max_sequence_idle_microseconds` (not one with
    /// a request running), and forgets starts that never got a slot.
    fn reap(&self) {
        let now = Instant::now();
        let idle = self.policy.idle;
        let mut released = 0;
        self.table
            .lock()
            .expect("sequence table")
            .retain(|_, entry| {
                let Ok(mut live) = entry.live.try_lock() else {
                    return true; // a request runs, or a start waits for a slot
                };
                if live.is_none() {
                    return false; // a start that never got its slot (cancelled)
                }
                let last = *entry.last.lock().expect("idle clock");
                if now.duration_since(last) < idle {
                    return true;
                }
                live.take();
                released += 1;
                false
            });
        for _ in 0..released {
            self.metrics.ended(How::Idle);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No request runs now (each holds the model), so every entry can be looked at.
        let active = self
            .table
            .get_mut()
            .expect("sequence table")
            .values()
            .filter(|e| e.live.try_lock().is_ok_and(|live| live.is_some()))
            .count();
        for _ in 0..active {
            self.metrics.ended(How::Unload);
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

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    /// One state value; the "model" adds 1 to it.
    fn sequences(slots: usize, backlog: usize) -> (Sequences, SequenceMetrics) {
        let state = policy::State {
            input: "S_IN".into(),
            output: "S_OUT".into(),
            datatype: DataType::F32,
            initial: Tensor {
                name: "S_IN".into(),
                datatype: DataType::F32,
                shape: vec![1, 1],
                data: TensorData::Fixed(Bytes::from(0f32.to_le_bytes().to_vec())),
            },
        };
        let policy = Policy {
            oldest: true,
            slots,
            idle: Duration::from_secs(60),
            batch: None,
            controls: vec![],
            states: vec![state],
            batched: true,
        };
        let metrics = SequenceMetrics::default();
        let s = Sequences::new("m", 1, policy, backlog, ByteBudget::new(0), &metrics);
        (s, metrics)
    }

    async fn step(s: &Sequences, n: u64, start: bool, end: bool) -> Result<f32, Error> {
        let seq = Sequence {
            id: Id::Int(n),
            key: format!("i:{n}"),
            start,
            end,
        };
        let outs = s
            .run(
                Some(seq),
                1,
                None,
                vec![],
                vec!["S_OUT".into()],
                |inputs, _| async move {
                    let TensorData::Fixed(b) = &inputs[0].data else {
                        unreachable!()
                    };
                    let v = f32::from_le_bytes(b[..4].try_into().unwrap()) + 1.0;
                    Ok(vec![Tensor {
                        name: "S_OUT".into(),
                        datatype: DataType::F32,
                        shape: vec![1, 1],
                        data: TensorData::Fixed(Bytes::from(v.to_le_bytes().to_vec())),
                    }])
                },
            )
            .await?;
        let TensorData::Fixed(b) = &outs[0].data else {
            unreachable!()
        };
        Ok(f32::from_le_bytes(b[..4].try_into().unwrap()))
    }

    fn gauge(
        f: &prometheus_client::metrics::family::Family<crate::metrics::ModelLabels, Gauge>,
    ) -> i64 {
        f.get_or_create(&crate::metrics::ModelLabels {
            model: "m".into(),
            version: "1".into(),
        })
        .get()
    }

    #[tokio::test]
    async fn state_carries_over_and_a_cancelled_wait_gives_its_place_back() {
        let (s, metrics) = sequences(1, 1);
        assert_eq!(step(&s, 1, true, false).await.unwrap(), 1.0);
        assert_eq!(step(&s, 1, false, false).await.unwrap(), 2.0);
        assert_eq!(gauge(&metrics.state_bytes), 4);
        // The one slot is taken: a new sequence waits; cancelled (dropped), it leaves the
        // backlog, so the next one may wait in its place rather than being refused.
        assert!(step(&s, 2, true, false).now_or_never().is_none());
        assert_eq!(gauge(&metrics.waiting), 0);
        let mut third = Box::pin(step(&s, 3, true, false));
        assert!((&mut third).now_or_never().is_none(), "waits, not refused");
        let refused = step(&s, 4, true, false)
            .now_or_never()
            .unwrap()
            .unwrap_err();
        assert!(refused.to_string().contains("sequence slots"), "{refused}");
        // The first ends: the waiting one gets its slot, with fresh state.
        assert_eq!(step(&s, 1, false, true).await.unwrap(), 3.0);
        assert_eq!(third.await.unwrap(), 1.0);
        assert_eq!(gauge(&metrics.active), 1);
        assert_eq!(gauge(&metrics.state_bytes), 4);
        // The cancelled start left nothing behind: its id is not a sequence, and the
        // reaper forgets its entry.
        let err = step(&s, 2, false, false).await.unwrap_err();
        assert!(
            err.to_string().contains("must specify the START flag"),
            "{err}"
        );
        assert!(step(&s, 5, true, false).now_or_never().is_none());
        s.inner.reap();
        assert_eq!(s.open(), 1, "only the running sequence is kept");
        drop(s);
        assert_eq!(gauge(&metrics.active), 0);
        assert_eq!(gauge(&metrics.state_bytes), 0);
        let unloaded = metrics.ended.get_or_create(&metrics::EndLabels {
            model: "m".into(),
            version: "1".into(),
            how: "unload".into(),
        });
        assert_eq!(unloaded.get(), 1, "the one active sequence");
    }
}
