//! Hedging (the routing file's `hedge`): when a request's first attempt has not answered
//! after the model's delay, a second copy goes to another worker; the first answer wins
//! and the other attempt is dropped at once, which cancels it on its worker (a stream
//! message's cancel, a unary call's reset), so a copy still queued there never runs.
//!
//! A hedge is a retry in the budget's eyes (it draws on the retry budget and is never sent
//! when that is empty), its bytes count against the gateway's byte budget, and it is never
//! sent for a request of a Triton sequence (its state lives on one worker).

use std::{sync::atomic::Ordering::Relaxed, sync::Arc, time::Duration};

use infermesh_core::raw::{RawAnswer, RawRequest};
use tokio::time::Instant;
use tonic::Status;
// withdraw() of the retry budget.
use tower::retry::budget::Budget as _;

use crate::{
    failure,
    forward::{Mesh, Retries},
    route::Target,
};

/// Triton's sequence batcher parameters: a request carrying one is never hedged.
const SEQUENCE: [&str; 3] = ["sequence_id", "sequence_start", "sequence_end"];

/// How long to wait before hedging the request's first attempt; `None`: not hedged.
pub fn delay<M: Mesh>(mesh: &M, target: &Target, req: &RawRequest) -> Option<Duration> {
    target.policy.hedge?;
    target.policy.records.counts.requests.fetch_add(1, Relaxed);
    if SEQUENCE.iter().any(|p| req.parameters.contains_key(*p)) {
        return None;
    }
    mesh.hedge_after(target)
}

/// The attempt that answered: its worker, its result and when it started.
pub type Answered<W> = (W, Result<RawAnswer, Status>, Instant);

/// Runs the first attempt on `first`; after `after` without an answer, races a copy on
/// another worker. A copy that fails leaves the race to the other; its worker goes into
/// `tried`, so a retry does not go back to it.
#[allow(clippy::too_many_arguments)]
pub async fn race<M: Mesh>(
    mesh: &M,
    retries: &Retries<'_>,
    target: &Target,
    first: M::Worker,
    req: &Arc<RawRequest>,
    left: Option<Duration>,
    after: Duration,
    tried: &mut Vec<String>,
) -> Answered<M::Worker> {
    let t0 = Instant::now();
    // The attempts borrow their own handles; the ones returned are the originals.
    let on_first = first.clone();
    let a = mesh.attempt(&on_first, req, target.version, left, 1);
    tokio::pin!(a);
    tokio::select! {
        biased;
        r = &mut a => return (first, r, t0),
        () = tokio::time::sleep(after) => {}
    }
    let Some(second) = second(mesh, retries, target, &first, req) else {
        let r = a.await;
        return (first, r, t0);
    };
    let (second, _permit) = second;
    let records = &target.policy.records;
    records.counts.hedged.fetch_add(1, Relaxed);
    let t1 = Instant::now();
    let on_second = second.clone();
    let b = mesh.attempt(
        &on_second,
        req,
        target.version,
        left.map(|l| l.saturating_sub(after)),
        2,
    );
    tokio::pin!(b);
    tokio::select! {
        r = &mut a => match r {
            Ok(answer) => {
                // The copy lost: dropped here, cancelled on its worker.
                records.hedge_lost.inc();
                (first, Ok(answer), t0)
            }
            Err(status) => {
                given_up(mesh, target, &first, &status, tried);
                let r = b.await;
                if r.is_ok() {
                    won(target);
                }
                (second, r, t1)
            }
        },
        r = &mut b => match r {
            Ok(answer) => {
                won(target);
                // The first attempt is cancelled, but the time it had taken still counts,
                // or the percentile would drift down and hedges multiply.
                mesh.observe(target, t0.elapsed());
                (second, Ok(answer), t1)
            }
            Err(status) => {
                given_up(mesh, target, &second, &status, tried);
                let r = a.await;
                records.hedge_lost.inc();
                (first, r, t0)
            }
        },
    }
}

/// Another worker for the copy, when the budgets allow one.
fn second<M: Mesh>(
    mesh: &M,
    retries: &Retries<'_>,
    target: &Target,
    first: &M::Worker,
    req: &RawRequest,
) -> Option<(M::Worker, Option<infermesh_core::admission::BytesPermit>)> {
    let (worker, _) = mesh.balance(target, &[M::addr(first).to_string()])?;
    let permit = match retries.bytes.map(|b| b.acquire(req.bytes.len())) {
        Some(Err(_)) => return None,
        Some(Ok(p)) => Some(p),
        None => None,
    };
    if !retries.budget.withdraw() {
        retries.metrics.retry_budget_exhausted.inc();
        return None;
    }
    Some((worker, permit))
}

fn won(target: &Target) {
    target.policy.records.hedge_won.inc();
    target.policy.records.counts.won.fetch_add(1, Relaxed);
}

/// A raced attempt failed while the other went on: its worker learns from it.
fn given_up<M: Mesh>(
    mesh: &M,
    target: &Target,
    worker: &M::Worker,
    status: &Status,
    tried: &mut Vec<String>,
) {
    mesh.learn(
        worker,
        &target.model,
        Some((failure::classify(status), status)),
    );
    tried.push(M::addr(worker).to_string());
}
