//! Forward: one request's way to an answer. Each attempt routes the request to a target
//! and balances it to a worker (`Mesh::choose`), runs within what is left of the deadline,
//! and on a failure that did not answer about the request itself (`failure`) tries another
//! worker while the retry budget allows. A request that breaks `max_breaks` workers'
//! connections is a query of death: refused from then on (`poison`).

use std::{future::Future, sync::Arc, time::Duration};

use infermesh_core::{
    raw::{RawAnswer, RawRequest},
    reason, Error, Reason,
};
use tokio::time::Instant;
use tonic::Status;
// deposit() and withdraw() of the retry budget.
use tower::retry::budget::Budget as _;

use crate::{
    failure::{self, Failure},
    guard, hedge,
    metrics::{CodeLabels, GatewayMetrics},
    poison::{self, Quarantine},
    retry::Budget,
    route::Target,
};

/// What forwarding needs from the mesh: the gateway's is its pool of workers (`mesh`);
/// tests use fakes.
pub trait Mesh {
    type Worker: Clone;
    /// Route: the request's target, once per request.
    fn route(&self, model: &str, version: &str) -> Result<Target, Error>;
    /// For a request that named no version, once no worker is left for `target`'s: its
    /// next version, leaving out `without`; `None` for a named version.
    fn reroute(&self, target: &Target, without: &[i64]) -> Option<Target>;
    /// Balance: a worker for the target, not one of `tried`, and whether another untried
    /// one could take it too.
    fn balance(&self, target: &Target, tried: &[String]) -> Option<(Self::Worker, bool)>;
    /// Why no worker can take the target (when no attempt said more).
    fn no_worker(&self, target: &Target) -> Error;
    fn addr(worker: &Self::Worker) -> &str;
    /// One attempt of `req` at `version` on `worker`, bounded by `left`. `n` counts
    /// attempts from 1.
    fn attempt(
        &self,
        worker: &Self::Worker,
        req: &Arc<RawRequest>,
        version: i64,
        left: Option<Duration>,
        n: usize,
    ) -> impl Future<Output = Result<RawAnswer, Status>> + Send;
    /// What an attempt taught about its worker (`None`: it answered).
    fn learn(&self, worker: &Self::Worker, model: &str, failed: Option<(Failure, &Status)>);
    /// The target's recent 99th-percentile answer time, once known.
    fn p99(&self, target: &Target) -> Option<Duration>;
    /// A successful attempt's time (or a hedged attempt's that lost the race).
    fn observe(&self, target: &Target, took: Duration);
    /// How long a first attempt waits before a hedged copy is sent (`None`: no hedging
    /// for this target, or not yet enough answers for its percentile).
    fn hedge_after(&self, target: &Target) -> Option<Duration>;
}

/// The shortest per-attempt timeout: below it, timing out would cut ordinary answers.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// A per-attempt bound, and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub after: Duration,
    /// The worker's own slowness set it (4 × p99, at least 200 ms), not the client's
    /// short deadline: only then does running past it count toward ejecting the worker.
    pub own: bool,
}

/// How long one attempt may take when another worker could take over: half of what is
/// left, and at most 4 × the route's p99 (at least 200 ms), so an attempt stuck on a
/// worker that stopped answering leaves room for another. `None`: no such bound.
pub fn attempt_bound(left: Option<Duration>, p99: Option<Duration>) -> Option<Bound> {
    let (left, p99) = (left?, p99?);
    let own = (p99 * 4).max(MIN_ATTEMPT);
    Some(Bound {
        after: (left / 2).min(own),
        own: own <= left / 2,
    })
}

/// The shared state retries draw on.
pub struct Retries<'a> {
    pub budget: &'a Budget,
    pub quarantine: &'a Quarantine,
    pub metrics: &'a GatewayMetrics,
    /// The gateway's byte budget, which hedged copies count against.
    pub bytes: Option<&'a infermesh_core::admission::ByteBudget>,
}

/// What is left of the deadline for the next attempt; DEADLINE_EXCEEDED once it passed.
pub fn time_left(deadline: Option<Instant>, now: Instant) -> Result<Option<Duration>, Status> {
    match deadline.map(|d| d.saturating_duration_since(now)) {
        Some(left) if left.is_zero() => Err(reason::status(
            tonic::Code::DeadlineExceeded,
            "deadline passed before a worker answered",
            Reason::Deadline,
        )),
        left => Ok(left),
    }
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Try another worker.
    Retry,
    /// Answer the client with this attempt's status.
    GiveUp,
    /// The request broke its last allowed worker: refuse it from now on.
    Poisoned,
}

/// The retry decision for a failed attempt. `breaks` counts the workers whose connection
/// broke under this request, this attempt included.
pub fn decide(
    failure: Failure,
    breaks: u32,
    target: &Target,
    budget_left: impl FnOnce() -> bool,
) -> Next {
    if !failure.retryable() || !target.policy.retry {
        return Next::GiveUp;
    }
    if breaks >= target.policy.max_breaks {
        return Next::Poisoned;
    }
    if !budget_left() {
        return Next::GiveUp;
    }
    Next::Retry
}

/// Forwards `req` (its version already taken into `version`) until an answer, a final
/// failure, or no worker is left to try. Routed once; routed again only when no worker is
/// left for the version a request that named none was given (never to a version a named
/// request must not reach).
pub async fn forward<M: Mesh>(
    mesh: &M,
    retries: &Retries<'_>,
    req: &Arc<RawRequest>,
    version: &str,
    deadline: Option<Instant>,
) -> Result<RawAnswer, Status> {
    let mut target = mesh.route(&req.model_name, version)?;
    let mut tries = Tries::default();
    loop {
        let Some((worker, fallback)) = mesh.balance(&target, &tries.workers) else {
            tries.given_up.push(target.version);
            if let Some(next) = mesh.reroute(&target, &tries.given_up) {
                target = next;
                continue;
            }
            // Nobody left to try: the last failure says more than "no worker".
            return Err(tries.last.unwrap_or_else(|| mesh.no_worker(&target).into()));
        };
        let left = time_left(deadline, Instant::now())?;
        // A bound shorter than the deadline only where another worker could take over.
        // Looked up only for requests with a deadline and another worker to go to.
        let bound = (left.is_some() && fallback)
            .then(|| attempt_bound(left, mesh.p99(&target)))
            .flatten();
        // The worker is told the bound too (its deadline), so a stuck attempt that is
        // still queued there never runs.
        let n = tries.workers.len() + 1;
        let limit = bound.map(|b| b.after).or(left);
        let hedge = (n == 1).then(|| hedge::delay(mesh, &target, req)).flatten();
        let (worker, result, started) = match hedge {
            Some(after) => {
                hedge::race(
                    mesh,
                    retries,
                    &target,
                    worker,
                    req,
                    limit,
                    after,
                    &mut tries.workers,
                )
                .await
            }
            None => {
                let started = Instant::now();
                let result = mesh.attempt(&worker, req, target.version, limit, n).await;
                (worker, result, started)
            }
        };
        let status = match result {
            Ok(resp) => {
                guarded(&target, None, None);
                mesh.observe(&target, started.elapsed());
                mesh.learn(&worker, &req.model_name, None);
                return Ok(resp);
            }
            Err(status) => status,
        };
        let judged = judge(&status, bound, started, deadline, M::addr(&worker));
        guarded(&target, Some(&status), judged.as_ref().ok().copied());
        let failure = judged?;
        mesh.learn(&worker, &req.model_name, Some((failure, &status)));
        tries.failed(retries, failure, status, &target, M::addr(&worker))?;
        if tries.poisoned {
            return Err(poisoned(retries.quarantine, req, version, &tries));
        }
    }
}

/// Tells the model's guard, when it guards the target's version, what an attempt came to
/// (a passed deadline, `failure` None, counts as a timeout).
fn guarded(target: &Target, status: Option<&Status>, failure: Option<Failure>) {
    if let Some(g) = &target.policy.guard {
        if g.rule.version == target.version {
            let failure = failure.or(status.map(|_| Failure::TimedOut));
            g.attempted(guard::judged(status, failure), target.policy.split.as_ref());
        }
    }
}

/// What one request's attempts so far have come to.
#[derive(Default)]
struct Tries {
    /// The workers tried, in order.
    workers: Vec<String>,
    /// Versions no worker was left for (a request that named none).
    given_up: Vec<i64>,
    /// The last failure, the answer once nobody is left to try.
    last: Option<Status>,
    /// Workers whose connection broke under this request.
    breaks: u32,
    poisoned: bool,
}

impl Tries {
    /// Takes a failed attempt on `worker`: `Ok` to try another, `Err` the client's answer.
    fn failed(
        &mut self,
        retries: &Retries<'_>,
        failure: Failure,
        status: Status,
        target: &Target,
        worker: &str,
    ) -> Result<(), Status> {
        self.workers.push(worker.to_string());
        if poison::broke(&status) {
            self.breaks += 1;
        }
        let status = match failure {
            Failure::Broken => {
                failure::unreachable(format!("worker {worker} unreachable: {}", status.message()))
            }
            _ => status,
        };
        match decide(failure, self.breaks, target, || retries.budget.withdraw()) {
            Next::Retry => retrying(retries, &status, worker),
            Next::GiveUp => {
                if failure.retryable() && target.policy.retry {
                    retries.metrics.retry_budget_exhausted.inc();
                }
                return Err(status);
            }
            Next::Poisoned => self.poisoned = true,
        }
        self.last = Some(status);
        Ok(())
    }
}

/// What a failed attempt means: its failure, or the client's answer when the deadline
/// passed meanwhile (our own timeout on the worker call, which tonic reports as
/// CANCELLED, is the client's deadline, not the worker's fault).
fn judge(
    status: &Status,
    bound: Option<Bound>,
    started: Instant,
    deadline: Option<Instant>,
    worker: &str,
) -> Result<Failure, Status> {
    let now = Instant::now();
    let passed = deadline.is_some_and(|d| now >= d);
    if passed
        && (status.code() != tonic::Code::DeadlineExceeded || reason::of_status(status).is_none())
    {
        return Err(reason::status(
            tonic::Code::DeadlineExceeded,
            format!("deadline passed while worker {worker} was answering"),
            Reason::Deadline,
        ));
    }
    let timed_out = bound.filter(|b| now - started >= b.after && !passed);
    Ok(match timed_out {
        Some(Bound { own: true, .. }) => Failure::TimedOut,
        // Cut short by the client's own short deadline: says nothing of the worker.
        Some(Bound { own: false, .. }) => Failure::OutOfTime,
        None => failure::classify(status),
    })
}

/// Counts a retry and says why.
fn retrying(retries: &Retries<'_>, status: &Status, worker: &str) {
    let labels = CodeLabels {
        code: format!("{:?}", status.code()),
    };
    retries.metrics.retries.get_or_create(&labels).inc();
    tracing::debug!(trace_id = %infermesh_core::trace::trace_id(), worker, code = ?status.code(), "retrying on another worker");
}

/// The request broke its last allowed worker: refuse its fingerprint from now on.
fn poisoned(quarantine: &Quarantine, req: &RawRequest, version: &str, tries: &Tries) -> Status {
    let (tried, breaks) = (&tries.workers, tries.breaks);
    let fp = quarantine.fingerprint(req, version);
    quarantine.add(fp);
    let ttl = quarantine.ttl().as_secs();
    tracing::error!(
        fingerprint = format!("{fp:016x}"),
        model = %infermesh_core::text::clip(&req.model_name),
        workers = ?tried,
        quarantine_secs = ttl,
        "a request broke {breaks} workers; identical requests are refused",
    );
    reason::status(
        tonic::Code::Unavailable,
        format!(
            "this request broke {breaks} workers (their connections failed while it was on them); identical requests are refused for {ttl}s (fingerprint {fp:016x})"
        ),
        Reason::Quarantined,
    )
}

#[cfg(test)]
mod tests;
