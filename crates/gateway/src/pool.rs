//! The set of workers, fed by discovery: membership only. Routing and balancing over it
//! are `route` and `balance`, put together in `mesh`.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    discovery::Change,
    endpoint::{Connect, Endpoint},
    metrics::{ChangeLabels, GatewayMetrics},
};

/// A worker and the task that keeps its state fresh.
type Member = (Arc<Endpoint>, JoinHandle<()>);

pub struct Pool {
    /// Workers by address.
    endpoints: RwLock<BTreeMap<String, Member>>,
    /// The same workers as one snapshot, replaced on every change: what each request
    /// reads, without a lock or a copy.
    snapshot: ArcSwap<Vec<Arc<Endpoint>>>,
    refresh: Duration,
    connect: Connect,
    metrics: GatewayMetrics,
}

impl Pool {
    pub fn new(refresh: Duration, connect: Connect, metrics: GatewayMetrics) -> Arc<Self> {
        Arc::new(Self {
            endpoints: RwLock::default(),
            snapshot: ArcSwap::default(),
            refresh,
            connect,
            metrics,
        })
    }

    /// Applies discovery changes until the source ends.
    pub async fn follow(self: Arc<Self>, mut changes: mpsc::Receiver<Change>) {
        while let Some(change) = changes.recv().await {
            self.apply(change);
        }
    }

    pub fn apply(self: &Arc<Self>, change: Change) {
        let mut eps = self.endpoints.write().expect("pool lock");
        match change {
            Change::Insert(found) if !eps.contains_key(&found.addr) => {
                let addr = found.addr.clone();
                match Endpoint::new(found, &self.connect, self.metrics.worker(&addr)) {
                    Ok(ep) => {
                        let (refresh, timeout) =
                            (self.refresh, self.connect.timeout.max(self.refresh));
                        let task = tokio::spawn(ep.clone().keep_fresh(refresh, timeout));
                        tracing::info!(worker = %addr, "worker added");
                        self.count_change("insert");
                        eps.insert(addr, (ep, task));
                    }
                    Err(e) => tracing::error!(error = %e, "ignoring worker"),
                }
            }
            Change::Insert(_) => {}
            Change::Remove(addr) => {
                if let Some((ep, task)) = eps.remove(&addr) {
                    task.abort();
                    // Streams still open to it see this and close.
                    ep.mark_unready("removed by discovery".into());
                    tracing::info!(worker = %addr, "worker removed");
                    self.count_change("remove");
                    self.metrics.forget_worker(&addr);
                }
            }
        }
        self.snapshot
            .store(Arc::new(eps.values().map(|(e, _)| e.clone()).collect()));
    }

    fn count_change(&self, change: &str) {
        let labels = ChangeLabels {
            change: change.into(),
        };
        self.metrics.discovery_changes.get_or_create(&labels).inc();
    }

    /// Stops every worker's refresher and drops its connections.
    pub fn close(&self) {
        for (_, (_, task)) in std::mem::take(&mut *self.endpoints.write().expect("pool lock")) {
            task.abort();
        }
        self.snapshot.store(Arc::default());
    }

    /// Whether any worker lists the model (bounds metric labels to real models).
    pub fn knows(&self, model: &str) -> bool {
        self.all().iter().any(|e| e.knows(model))
    }

    /// Every worker, as of the last change.
    pub fn all(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.snapshot.load_full()
    }

    pub fn any_ready(&self) -> bool {
        self.all().iter().any(|e| e.seen().ready)
    }

    /// Every model any worker lists, and whether a ready worker has a ready version of it
    /// or, in placement mode, would load it on request (the gateway's per-model health,
    /// as ModelReady answers).
    pub fn model_health(&self) -> BTreeMap<String, bool> {
        let mut health = BTreeMap::new();
        for ep in self.all().iter() {
            let seen = ep.seen();
            let placing = seen.takes_loads();
            for name in seen.known {
                let serving = seen.ready && seen.models.contains_key(&name) || placing;
                *health.entry(name).or_insert(false) |= serving;
            }
        }
        health
    }
}
