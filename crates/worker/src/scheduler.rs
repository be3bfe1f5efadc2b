//! The per-model scheduler: one bounded queue and one batching task. Requests wait here
//! until an instance is idle; then the oldest request and the compatible ones behind it
//! (same inputs and non-batch dims) form a batch up to max_batch_size, preferring
//! preferred_batch_size and waiting at most max_queue_delay for more (to within tens of
//! microseconds: see `wait_until`, not tokio's millisecond timer). A lone caller is
//! not made to wait: after FUTILE_WAITS waits in a row that no request joined, a request
//! alone in the queue goes at once, until two are queued together again. Requests whose
//! caller went away or whose deadline passed are dropped before the engine.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use infermesh_core::{Error as RequestError, Tensor};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{model_config::BatchPolicy, stats::Stats, Error};

/// A request waiting for an instance.
pub struct Pending {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<String>,
    pub rows: usize,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Result<Vec<Tensor>, Error>>,
    /// The request's span, which the batch that serves it links to.
    pub span: tracing::Span,
    /// Open while the request waits; closed when an instance takes it.
    pub queue_span: tracing::Span,
    /// Set when an instance takes it, so a stream cancel can say whether work was done.
    pub started: Option<infermesh_core::stream::Started>,
}

impl Pending {
    /// Requests batch together only with the same input names and non-batch dims.
    fn compatible(&self, other: &Pending) -> bool {
        self.inputs.len() == other.inputs.len()
            && self.inputs.iter().all(|a| {
                other
                    .inputs
                    .iter()
                    .any(|b| a.name == b.name && a.shape.get(1..) == b.shape.get(1..))
            })
    }
}

/// Requests handed to one idle instance. Dropping `slot` marks the instance idle again.
pub struct Batch {
    pub items: Vec<Pending>,
    pub dispatched: Instant,
    pub slot: OwnedSemaphorePermit,
}

pub struct Scheduler {
    model: String,
    tx: mpsc::UnboundedSender<Pending>,
    /// Requests accepted and not yet dispatched (exported as queue_depth); bounded by
    /// `capacity`.
    queued: Gauge,
    capacity: usize,
    stats: Arc<Stats>,
}

impl Scheduler {
    /// Starts the batching task. `jobs` feeds the instance threads; `instances` of them.
    pub fn start(
        model: String,
        policy: Option<BatchPolicy>,
        capacity: usize,
        instances: usize,
        jobs: crossbeam_channel::Sender<Batch>,
        stats: Arc<Stats>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = stats.metrics.queue_depth.clone();
        let task = Batcher {
            rx,
            policy,
            slots: Arc::new(Semaphore::new(instances.max(1))),
            jobs,
            queued: queued.clone(),
            stats: stats.clone(),
            queue: VecDeque::new(),
            closed: false,
            futile_waits: 0,
        };
        tokio::runtime::Handle::current().spawn(task.run());
        Self {
            model,
            tx,
            queued,
            capacity,
            stats,
        }
    }

    /// Queues a validated request and waits for its outputs. A full queue answers
    /// RESOURCE_EXHAUSTED at once.
    pub async fn submit(
        &self,
        inputs: Vec<Tensor>,
        outputs: Vec<String>,
        rows: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<Tensor>, Error> {
        let model = &self.model;
        if deadline.is_some_and(|d| d <= Instant::now()) {
            self.stats.skipped_expired(Duration::ZERO);
            return Err(RequestError::DeadlineExceeded(format!(
                "model '{model}': the request's deadline passed before it was queued; it was not run"
            ))
            .into());
        }
        if self.queued.inc() as usize >= self.capacity {
            self.queued.dec();
            return Err(RequestError::ResourceExhausted(format!(
                "model '{model}': queue is full ({} requests waiting, max_queue_size {}); retry later or on another worker",
                self.capacity, self.capacity
            ))
            .into());
        }
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            inputs,
            outputs,
            rows,
            enqueued: Instant::now(),
            deadline,
            reply,
            span: infermesh_core::trace::current(),
            queue_span: infermesh_core::child_span!("queue"),
            started: infermesh_core::stream::Started::current(),
        };
        if self.tx.send(pending).is_err() {
            self.queued.dec();
            return Err(
                RequestError::Unavailable(format!("model '{model}' is being unloaded")).into(),
            );
        }
        rx.await.map_err(|_| {
            Error::Runtime(format!(
                "model '{model}': instance stopped while running the request"
            ))
        })?
    }
}

struct Batcher {
    rx: mpsc::UnboundedReceiver<Pending>,
    policy: Option<BatchPolicy>,
    /// One permit per instance: a batch is formed only when an instance is idle, so
    /// requests keep gathering while all instances are busy.
    slots: Arc<Semaphore>,
    jobs: crossbeam_channel::Sender<Batch>,
    queued: Gauge,
    stats: Arc<Stats>,
    queue: VecDeque<Pending>,
    closed: bool,
    /// Waits in a row that ran out with no other request joining.
    futile_waits: u32,
}

/// After this many futile waits in a row, a lone request is not made to wait.
const FUTILE_WAITS: u32 = 8;

/// Sleeps until `t`, or forever when there is none.
async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// When one request waits for company, the last stretch of its wait is spent yielding to
/// the runtime rather than asleep: a thread that keeps polling sees the request that
/// joins it tens of microseconds sooner than one woken from sleep (on a VM a wake-up is
/// an interrupt and an exit). With several queued the machine is busy, and the CPU is
/// better left to the engine; a lone caller never waits at all.
const SPIN_STRETCH: Duration = Duration::from_micros(200);

/// Waits until `until`: asleep on the precise timer (tokio's would round a 200 µs
/// delay up to a millisecond or more), then, if `spin`, polling for the last
/// SPIN_STRETCH.
async fn wait_until(until: Instant, spin: bool) {
    let spin_from = if spin {
        until.checked_sub(SPIN_STRETCH)
    } else {
        Some(until)
    };
    if let Some(spin_from) = spin_from {
        if spin_from > Instant::now() {
            infermesh_core::precise::sleep_until(spin_from).await;
        }
    }
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

enum Plan {
    /// Dispatch the first `n` compatible requests (indices into the queue).
    Now(Vec<usize>),
    /// Wait for more requests until this instant.
    Wait(Instant),
}

impl Batcher {
    async fn run(mut self) {
        loop {
            if self.queue.is_empty() {
                if self.closed {
                    return;
                }
                match self.rx.recv().await {
                    Some(p) => self.queue.push_back(p),
                    None => return,
                }
            }
            self.take_arrivals();
            self.prune();
            if self.queue.is_empty() {
                continue;
            }
            // Wait for an idle instance while still taking requests, and answer a queued
            // request whose deadline passes meanwhile when it passes.
            let next_deadline = self.queue.iter().filter_map(|p| p.deadline).min();
            let slot = tokio::select! {
                biased;
                slot = self.slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
                p = self.rx.recv(), if !self.closed => {
                    match p {
                        Some(p) => self.queue.push_back(p),
                        None => self.closed = true,
                    }
                    continue;
                }
                () = sleep_until_opt(next_deadline) => continue,
            };
            self.fill(slot).await;
        }
    }

    /// Holding an idle instance: form a batch now, or wait (bounded by the queue delay
    /// and deadlines) for more requests.
    async fn fill(&mut self, slot: OwnedSemaphorePermit) {
        loop {
            self.take_arrivals();
            self.prune();
            if self.queue.is_empty() {
                return;
            }
            match self.plan(Instant::now()) {
                Plan::Now(indices) => {
                    let mut items = Vec::with_capacity(indices.len());
                    for (taken, i) in indices.into_iter().enumerate() {
                        items.push(self.queue.remove(i - taken).expect("index in queue"));
                    }
                    self.queued.dec_by(items.len() as i64);
                    let now = Instant::now();
                    if let (Some(policy), [only]) = (&self.policy, items.as_slice()) {
                        if only.enqueued + policy.max_queue_delay <= now {
                            self.futile_waits = self.futile_waits.saturating_add(1);
                        }
                    }
                    items
                        .iter()
                        .filter_map(|p| p.started.as_ref())
                        .for_each(|s| s.set());
                    let batch = Batch {
                        items,
                        dispatched: now,
                        slot,
                    };
                    if let Err(e) = self.jobs.send(batch) {
                        // Every instance thread is gone (model unloading).
                        for p in e.into_inner().items {
                            let _ = p.reply.send(Err(RequestError::Unavailable(
                                "model is being unloaded".into(),
                            )
                            .into()));
                        }
                    }
                    return;
                }
                Plan::Wait(until) => {
                    tokio::select! {
                        p = self.rx.recv(), if !self.closed => match p {
                            Some(p) => self.queue.push_back(p),
                            None => self.closed = true,
                        },
                        () = wait_until(until, self.queue.len() == 1) => {}
                    }
                }
            }
        }
    }

    fn take_arrivals(&mut self) {
        while let Ok(p) = self.rx.try_recv() {
            self.queue.push_back(p);
        }
        if self.queue.len() > 1 {
            self.futile_waits = 0;
        }
    }

    /// Drops requests nobody waits for and answers expired ones, before the engine.
    fn prune(&mut self) {
        let now = Instant::now();
        let before = self.queue.len();
        let stats = &self.stats;
        self.queue.retain_mut(|p| {
            if p.reply.is_closed() {
                stats.skipped_cancelled();
                return false;
            }
            if p.deadline.is_some_and(|d| d <= now) {
                stats.skipped_expired(now - p.enqueued);
                let waited = now - p.enqueued;
                let (tx, _) = oneshot::channel();
                let reply = std::mem::replace(&mut p.reply, tx);
                let _ = reply.send(Err(RequestError::DeadlineExceeded(format!(
                    "deadline passed after {waited:?} in the queue; the request was not run"
                ))
                .into()));
                return false;
            }
            true
        });
        self.queued.dec_by((before - self.queue.len()) as i64);
    }

    fn plan(&self, now: Instant) -> Plan {
        let Some(policy) = &self.policy else {
            return Plan::Now(vec![0]);
        };
        let head = &self.queue[0];
        let mut taken = Vec::new();
        let mut prefix = Vec::new(); // running row totals after each taken request
        let mut rows = 0;
        for (i, p) in self.queue.iter().enumerate() {
            if !p.compatible(head) {
                continue;
            }
            if rows + p.rows > policy.max_batch_size {
                break;
            }
            rows += p.rows;
            taken.push(i);
            prefix.push(rows);
        }
        if taken.is_empty() {
            // A request larger than max_batch_size cannot pass validation; be safe anyway.
            return Plan::Now(vec![0]);
        }
        // Triton's order: the largest preferred size that the queue can form exactly, else
        // max_batch_size, else whatever is there once the oldest has waited long enough.
        if let Some(cut) = prefix.iter().rposition(|r| policy.preferred.contains(r)) {
            taken.truncate(cut + 1);
            return Plan::Now(taken);
        }
        if rows >= policy.max_batch_size {
            return Plan::Now(taken);
        }
        // Waiting cannot help a lone caller: once several waits in a row ran out with no
        // request joining, a request alone in the queue goes at once, until two are seen
        // queued together again (take_arrivals).
        if self.queue.len() == 1 && self.futile_waits >= FUTILE_WAITS {
            return Plan::Now(taken);
        }
        let due = head.enqueued + policy.max_queue_delay;
        if now >= due {
            return Plan::Now(taken);
        }
        let earliest_deadline = self.queue.iter().filter_map(|p| p.deadline).min();
        Plan::Wait(earliest_deadline.map_or(due, |d| d.min(due)))
    }
}
