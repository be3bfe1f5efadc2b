//! `infermesh.placement.v1.Placement/Watch`: a snapshot of the worker's models and memory,
//! then each change. One publisher composes the changes (a model's state when the
//! repository reports it, its use at most once a second) into a bounded broadcast; each
//! follower relays it through a small queue, and one that falls behind the broadcast gets
//! a fresh snapshot in place of what it missed.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use infermesh_proto::placement::{
    placement_server, Memory, ModelVersion, WatchRequest, WatchResponse,
};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use super::Placement;
use crate::repository::Repository;

/// Changes a follower may fall behind by before it gets a snapshot instead.
const BACKLOG: usize = 64;

/// What a follower saw of a version's use at the last tick.
#[derive(Clone, Copy, Default, PartialEq)]
struct Seen {
    in_flight: u32,
    last_use_ms: i64,
    requests: u64,
    rate: f64,
}

pub struct Watcher {
    repo: Arc<Repository>,
    placement: Option<Arc<Placement>>,
    tx: broadcast::Sender<Arc<WatchResponse>>,
    sequence: AtomicU64,
    seen: Mutex<HashMap<(String, String), Seen>>,
}

impl Watcher {
    /// Starts the publisher; it ends with the process.
    pub fn start(repo: Arc<Repository>, placement: Option<Arc<Placement>>) -> Arc<Self> {
        let me = Arc::new(Self {
            repo,
            placement,
            tx: broadcast::channel(BACKLOG).0,
            sequence: AtomicU64::new(0),
            seen: Mutex::default(),
        });
        tokio::spawn(me.clone().publish());
        me
    }

    async fn publish(self: Arc<Self>) {
        let mut changes = self.repo.changes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(name) => {
                        let models = self.versions(Some(&name));
                        self.send(false, models);
                    }
                    // More changes than were read: everything, as it is now.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let models = self.versions(None);
                        self.send(true, models);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    let dt = last_tick.elapsed().as_secs_f64().max(1e-3);
                    last_tick = Instant::now();
                    let changed = self.tick(dt);
                    if !changed.is_empty() {
                        self.send(false, changed);
                    }
                }
            }
        }
    }

    fn send(&self, snapshot: bool, models: Vec<ModelVersion>) {
        let msg = WatchResponse {
            snapshot,
            sequence: self.sequence.fetch_add(1, Ordering::SeqCst) + 1,
            models,
            memory: Some(self.memory()),
        };
        // No follower is fine.
        let _ = self.tx.send(Arc::new(msg));
    }

    /// Everything, as it is now.
    pub fn snapshot(&self) -> WatchResponse {
        WatchResponse {
            snapshot: true,
            sequence: self.sequence.load(Ordering::SeqCst),
            models: self.versions(None),
            memory: Some(self.memory()),
        }
    }

    fn memory(&self) -> Memory {
        match &self.placement {
            Some(p) => Memory {
                capacity_bytes: p.capacity,
                used_bytes: p.used(&self.repo.ready_models()),
            },
            None => Memory::default(),
        }
    }

    /// The versions of `name` (or of every model), with their sizes and use.
    fn versions(&self, name: Option<&str>) -> Vec<ModelVersion> {
        let ready = self.repo.ready_models();
        let seen = self.seen.lock().expect("watch lock");
        self.repo
            .index()
            .into_iter()
            .filter(|m| name.is_none_or(|n| m.name == n))
            .map(|m| {
                let key = (m.name.clone(), m.version.clone());
                let loaded = ready
                    .iter()
                    .find(|r| r.name == m.name && r.version.to_string() == m.version);
                let size = m
                    .version
                    .parse::<i64>()
                    .ok()
                    .and_then(|v| self.placement.as_ref()?.size(&m.name, v));
                let use_now = loaded.map(|r| use_of(r, seen.get(&key).map_or(0.0, |s| s.rate)));
                ModelVersion {
                    pinned: self
                        .placement
                        .as_ref()
                        .is_some_and(|p| p.is_pinned(&m.name)),
                    name: m.name,
                    version: m.version,
                    state: m.state,
                    reason: m.reason,
                    memory_bytes: size.map_or(0, |s| s.bytes),
                    memory_measured: size.is_some_and(|s| s.measured),
                    device_memory_bytes: size.and_then(|s| s.device_bytes).unwrap_or(0),
                    load_seconds: size.map_or(0.0, |s| s.load.as_secs_f64()),
                    last_use_unix_ms: use_now.map_or(0, |u| u.last_use_ms),
                    in_flight: use_now.map_or(0, |u| u.in_flight),
                    requests_per_second: use_now.map_or(0.0, |u| u.rate),
                }
            })
            .collect()
    }

    /// Every version of each model whose use changed since the last tick, `dt` seconds
    /// ago (a change always carries all of a model's versions: a follower replaces the
    /// model's entries with them).
    fn tick(&self, dt: f64) -> Vec<ModelVersion> {
        let mut names = std::collections::BTreeSet::new();
        {
            let mut seen = self.seen.lock().expect("watch lock");
            for m in self.repo.ready_models() {
                let key = (m.name.clone(), m.version.to_string());
                let before = seen.get(&key).copied().unwrap_or_default();
                let requests = m.usage.requests();
                let rate = requests.saturating_sub(before.requests) as f64 / dt;
                let now = Seen {
                    requests,
                    rate,
                    ..use_of(&m, rate)
                };
                if now != before {
                    seen.insert(key, now);
                    names.insert(m.name.clone());
                }
            }
        }
        names
            .into_iter()
            .flat_map(|name| self.versions(Some(&name)))
            .collect()
    }
}

fn use_of(m: &crate::model::Model, rate: f64) -> Seen {
    Seen {
        in_flight: m.usage.in_flight() as u32,
        last_use_ms: crate::stats::now_ms() as i64 - m.usage.idle().as_millis() as i64,
        requests: m.usage.requests(),
        rate,
    }
}

/// Relays `changes` to `out` after `first`; a lag (the follower too slow for the backlog)
/// becomes a fresh snapshot from `snapshot`. Ends when the follower goes away.
pub async fn relay(
    first: WatchResponse,
    mut changes: broadcast::Receiver<Arc<WatchResponse>>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    snapshot: impl Fn() -> WatchResponse,
) {
    if out.send(Ok(first)).await.is_err() {
        return;
    }
    loop {
        let next = match changes.recv().await {
            Ok(msg) => (*msg).clone(),
            Err(broadcast::error::RecvError::Lagged(_)) => snapshot(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if out.send(Ok(next)).await.is_err() {
            return;
        }
    }
}

/// The gRPC service; its streams end when the worker starts refusing requests (so its
/// drain does not wait for followers that never hang up).
pub struct WatchService(pub Arc<Watcher>, pub infermesh_core::Lifecycle);

#[tonic::async_trait]
impl placement_server::Placement for WatchService {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Subscribed before the snapshot is taken: no change falls between the two.
        let changes = self.0.tx.subscribe();
        let first = self.0.snapshot();
        let (out, rx) = mpsc::channel(4);
        let watcher = self.0.clone();
        let lifecycle = self.1.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = relay(first, changes, out, move || watcher.snapshot()) => {}
                () = lifecycle.refusing() => {}
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(sequence: u64, snapshot: bool) -> WatchResponse {
        WatchResponse {
            snapshot,
            sequence,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_follower_gets_changes_in_order_and_a_snapshot_when_it_falls_behind() {
        let (tx, rx) = broadcast::channel(4);
        let (out, mut got) = mpsc::channel(1);
        let relay = tokio::spawn(relay(msg(0, true), rx, out, || msg(100, true)));
        assert_eq!(got.recv().await.unwrap().unwrap(), msg(0, true));
        for s in 1..=2 {
            tx.send(Arc::new(msg(s, false))).unwrap();
            assert_eq!(got.recv().await.unwrap().unwrap(), msg(s, false));
        }
        // The follower stops reading: its queue holds one, the relay one more, the
        // backlog four; the rest is lost to it. 21 marks the end.
        for s in 3..=21 {
            tx.send(Arc::new(msg(s, false))).unwrap();
        }
        let mut seen = Vec::new();
        while seen.last() != Some(&(21, false)) {
            let m = got.recv().await.unwrap().unwrap();
            seen.push((m.sequence, m.snapshot));
        }
        let at = seen
            .iter()
            .position(|&(s, snap)| snap && s == 100)
            .expect("a fresh snapshot in place of what it missed");
        // What comes after the snapshot is the rest of the backlog, in order.
        let after: Vec<u64> = seen[at + 1..].iter().map(|&(s, _)| s).collect();
        assert!(after.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(
            seen.len() < 21,
            "not every change was kept for it: {seen:?}"
        );
        drop(got);
        tx.send(Arc::new(msg(22, false))).unwrap();
        relay.await.unwrap();
    }
}
