//! Sticky sequences: a request (or stream message) carrying Triton's `sequence_id` goes to
//! the worker that holds its sequence, while requests without one are balanced as always,
//! in the same stream. The worker is chosen at the sequence's first request: the one this
//! gateway's table names, or else the first of the target's ready workers ranked by
//! rendezvous hashing of (model, sequence id) — the same in every gateway replica, and a
//! worker that leaves moves only its own sequences. A sequence request is never retried
//! on another worker and never hedged or shadowed (its state lives on one worker): when
//! its worker is gone, the client hears that the sequence's state was lost
//! (ABORTED, reason `sequence-lost`), and its next `sequence_start` picks a new worker.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use infermesh_core::sequence::Sequence;
use infermesh_core::{reason, text::clip, Reason};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::{endpoint::Endpoint, rank, route::Target};

/// Triton's sequence parameters of a request (None without a `sequence_id`).
pub fn of(parameters: &infermesh_core::raw::Parameters) -> Result<Option<Sequence>, Status> {
    infermesh_core::sequence::of(parameters).map_err(Status::from)
}

/// Where this gateway sent each open sequence.
pub struct Sticky {
    table: Mutex<HashMap<(String, String), Held>>,
    idle: Duration,
    max: usize,
    /// `infermesh_gateway_sequences_open` and `_lost_total`.
    open: prometheus_client::metrics::gauge::Gauge,
    lost: prometheus_client::metrics::counter::Counter,
}

struct Held {
    worker: String,
    version: i64,
    last: Instant,
}

impl Sticky {
    /// `idle`: a sequence unused this long is forgotten; `max`: sequences remembered at once.
    pub fn new(idle: Duration, max: usize, metrics: &crate::metrics::GatewayMetrics) -> Self {
        Self {
            table: Mutex::default(),
            idle,
            max,
            open: metrics.sequences_open.clone(),
            lost: metrics.sequences_lost.clone(),
        }
    }

    /// The worker and version for `seq`'s request to `model`, among `workers`: where the
    /// sequence is held, or (at its start, or unknown here) the first ranked of the ready
    /// workers of the version `route` gives, remembered for its next requests.
    pub fn worker(
        &self,
        workers: &[Arc<Endpoint>],
        model: &str,
        seq: &Sequence,
        route: impl FnOnce() -> Result<Target, Status>,
    ) -> Result<(Arc<Endpoint>, i64), Status> {
        let key = (model.to_string(), seq.key.clone());
        let now = Instant::now();
        let serving = |addr: &str, version: i64| {
            workers
                .iter()
                .find(|e| e.addr == addr && e.serves(model, Some(version)))
                .cloned()
        };
        if !seq.start {
            let mut table = self.table.lock().expect("sequence lock");
            if let Some(held) = table.get_mut(&key).filter(|h| now - h.last <= self.idle) {
                if let Some(ep) = serving(&held.worker, held.version) {
                    held.last = now;
                    return Ok((ep, held.version));
                }
                let worker = held.worker.clone();
                drop(table);
                return Err(self.lost(model, seq, &worker));
            }
        }
        // Routed once, at the start: a sequence stays on the version it started on.
        let target = route()?;
        let ready: Vec<&str> = workers
            .iter()
            .filter(|e| e.serves(model, Some(target.version)))
            .map(|e| e.addr.as_str())
            .collect();
        let Some(first) = rank::rank(&format!("{model}\0{}", seq.key), &ready)
            .first()
            .copied()
        else {
            return Err(
                crate::route::no_worker(workers, model, &target.version.to_string()).into(),
            );
        };
        let ep = serving(first, target.version).expect("ranked from the serving workers");
        if !(seq.start && seq.end) {
            let mut table = self.table.lock().expect("sequence lock");
            if table.len() >= self.max {
                table.retain(|_, h| now - h.last <= self.idle);
            }
            if table.len() >= self.max && !table.contains_key(&key) {
                return Err(reason::status(
                    Code::ResourceExhausted,
                    format!(
                        "{} sequences are open at this gateway, the most it keeps (--max-sequences)",
                        self.max
                    ),
                    Reason::OverBudget,
                ));
            }
            table.insert(
                key,
                Held {
                    worker: ep.addr.clone(),
                    version: target.version,
                    last: now,
                },
            );
            self.open.set(table.len() as i64);
        }
        Ok((ep, target.version))
    }

    /// The sequence ended (its `sequence_end` request answered): forgotten.
    pub fn ended(&self, model: &str, seq: &Sequence) {
        let mut table = self.table.lock().expect("sequence lock");
        table.remove(&(model.to_string(), seq.key.clone()));
        self.open.set(table.len() as i64);
    }

    /// The sequence's worker failed under it: forgotten, and the client told it is lost.
    pub fn lost(&self, model: &str, seq: &Sequence, worker: &str) -> Status {
        self.ended(model, seq);
        self.lost.inc();
        lost(model, seq, worker)
    }

    /// Sequences remembered now.
    pub fn open(&self) -> usize {
        self.table.lock().expect("sequence lock").len()
    }
}

fn lost(model: &str, seq: &Sequence, worker: &str) -> Status {
    reason::status(
        Code::Aborted,
        format!(
            "sequence {} of model '{}' was on worker {worker}, which is gone: its state is lost; start it again with sequence_start",
            seq.shown(),
            clip(model)
        ),
        Reason::SequenceLost,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::fakes;

    #[tokio::test]
    async fn a_sequence_stays_on_its_worker_until_it_is_gone() {
        let ws = fakes(1, 3, &[("m", &[1])]);
        let metrics = crate::metrics::GatewayMetrics::default();
        let sticky = Sticky::new(Duration::from_secs(60), 10, &metrics);
        let route = || Ok(crate::route::route(&ws, "m", "", &Default::default()).unwrap());
        let worker = |seq: &Sequence| {
            sticky
                .worker(&ws, "m", seq, route)
                .map(|(ep, _)| ep.addr.clone())
        };
        let seq = |n: u64, start, end| Sequence {
            id: infermesh_core::sequence::Id::Int(n),
            key: format!("i:{n}"),
            start,
            end,
        };
        // Spread over the workers, each sequence on one.
        let mut on = std::collections::HashSet::new();
        for n in 1..=30 {
            let first = worker(&seq(n, true, false)).unwrap();
            for _ in 0..3 {
                let next = worker(&seq(n, false, false)).unwrap();
                assert_eq!(next, first);
            }
            on.insert(first);
            sticky.ended("m", &seq(n, false, true));
        }
        assert_eq!(on.len(), 3, "sequences spread over every worker");
        assert_eq!(sticky.open(), 0);
        assert_eq!(metrics.sequences_open.get(), 0);
        // Its worker gone mid-sequence: lost, and forgotten; a new start picks another.
        let held = worker(&seq(99, true, false)).unwrap();
        let ep = ws.iter().find(|e| e.addr == held).unwrap();
        ep.mark_unready("killed".into());
        let err = worker(&seq(99, false, false)).unwrap_err();
        assert_eq!(err.code(), Code::Aborted);
        assert_eq!(reason::of_status(&err), Some(Reason::SequenceLost));
        assert!(err.message().contains("sequence 99"), "{err:?}");
        assert_eq!(metrics.sequences_lost.get(), 1);
        let again = worker(&seq(99, true, false)).unwrap();
        assert_ne!(again, held);
        // The table is bounded.
        for n in 100..109 {
            worker(&seq(n, true, false)).unwrap();
        }
        let full = worker(&seq(200, true, false)).unwrap_err();
        assert!(full.message().contains("--max-sequences"), "{full:?}");
    }
}
