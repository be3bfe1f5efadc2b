//! The set of workers, fed by discovery, and the choice among them: power of two choices
//! over the load estimate, among the workers where the model version is ready.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use infermesh_core::{text::clip, Error};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    discovery::Change,
    endpoint::{Endpoint, Seen},
    metrics::{ChangeLabels, GatewayMetrics},
};

/// A worker and the task that keeps its state fresh.
type Member = (Arc<Endpoint>, JoinHandle<()>);

pub struct Pool {
    /// Workers by address.
    endpoints: RwLock<BTreeMap<String, Member>>,
    refresh: Duration,
    connect_timeout: Duration,
    metrics: GatewayMetrics,
}

impl Pool {
    pub fn new(refresh: Duration, connect_timeout: Duration, metrics: GatewayMetrics) -> Arc<Self> {
        Arc::new(Self {
            endpoints: RwLock::default(),
            refresh,
            connect_timeout,
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
            Change::Insert(addr) if !eps.contains_key(&addr) => {
                match Endpoint::new(&addr, self.connect_timeout, self.metrics.worker(&addr)) {
                    Ok(ep) => {
                        let (refresh, timeout) =
                            (self.refresh, self.connect_timeout.max(self.refresh));
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
    }

    fn count_change(&self, change: &str) {
        let labels = ChangeLabels {
            change: change.into(),
        };
        self.metrics.discovery_changes.get_or_create(&labels).inc();
    }

    /// Whether any worker lists the model (bounds metric labels to real models).
    pub fn knows(&self, model: &str) -> bool {
        self.all().iter().any(|e| e.knows(model))
    }

    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .read()
            .expect("pool lock")
            .values()
            .map(|(e, _)| e.clone())
            .collect()
    }

    pub fn any_ready(&self) -> bool {
        self.all().iter().any(|e| e.seen().ready)
    }

    /// Every model any worker lists, and whether a ready worker has a ready version of it
    /// (the gateway's per-model health).
    pub fn model_health(&self) -> BTreeMap<String, bool> {
        let mut health = BTreeMap::new();
        for ep in self.all() {
            let seen = ep.seen();
            for name in seen.known {
                let serving = seen.ready && seen.models.contains_key(&name);
                *health.entry(name).or_insert(false) |= serving;
            }
        }
        health
    }

    /// Picks a worker for (model, version). Version "" goes to the newest version that any
    /// ready worker has, so a rollout moves traffic as soon as one worker has the new one.
    /// Returns the worker and the version to ask it for.
    pub fn pick(&self, model: &str, version: &str) -> Result<(Arc<Endpoint>, String), Error> {
        self.pick_excluding(model, version, &[])
    }

    /// As [`Pool::pick`], skipping workers already tried for this request.
    pub fn pick_excluding(
        &self,
        model: &str,
        version: &str,
        tried: &[String],
    ) -> Result<(Arc<Endpoint>, String), Error> {
        let all = self.all();
        let want: Option<i64> = if version.is_empty() {
            all.iter().filter_map(|e| e.newest(model)).max()
        } else {
            Some(version.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "model '{}': version '{}' is not a number",
                    clip(model),
                    clip(version)
                ))
            })?)
        };
        let candidates: Vec<&Arc<Endpoint>> = match want {
            Some(v) => all
                .iter()
                .filter(|e| e.serves(model, Some(v)) && !tried.contains(&e.addr))
                .collect(),
            None => Vec::new(),
        };
        let chosen = match candidates.len() {
            0 => return Err(self.no_worker(&all, model, version)),
            1 => candidates[0],
            n => {
                // Power of two choices: two distinct random candidates, the less loaded wins.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (ea, eb) = (candidates[a], candidates[b]);
                if ea.load.cost() <= eb.load.cost() {
                    ea
                } else {
                    eb
                }
            }
        };
        let version = want.map(|v| v.to_string()).unwrap_or_default();
        Ok((chosen.clone(), version))
    }

    fn no_worker(&self, all: &[Arc<Endpoint>], model: &str, version: &str) -> Error {
        // One snapshot of what each worker said, for every judgement below.
        let seen: Vec<Seen> = all.iter().map(|e| e.seen()).collect();
        let lines: Vec<String> = all
            .iter()
            .zip(&seen)
            .map(|(e, s)| {
                let why = match (&s.problem, s.models.get(model)) {
                    (Some(p), _) => p.clone(),
                    (None, Some(v)) => format!("ready versions {v:?}"),
                    (None, None) if s.known.contains(model) => "model not ready".into(),
                    (None, None) => "does not have the model".into(),
                };
                format!("{} ({why})", e.addr)
            })
            .collect();
        let workers = if lines.is_empty() {
            "none".into()
        } else {
            lines.join(", ")
        };
        let model = clip(model);
        let answered = seen.iter().any(|s| s.ready);
        if !seen.iter().any(|s| s.known.contains(model.0)) && answered {
            return Error::NotFound(format!("unknown model '{model}'; workers seen: {workers}"));
        }
        let what = if version.is_empty() {
            String::new()
        } else {
            format!(" version {version}")
        };
        // A version no worker lists in any state is not coming: NOT_FOUND, not retryable.
        if let Ok(v) = version.parse::<i64>() {
            let listed = seen
                .iter()
                .any(|s| s.versions.get(model.0).is_some_and(|vs| vs.contains(&v)));
            if answered && !listed {
                let have: BTreeSet<i64> = seen
                    .iter()
                    .filter_map(|s| s.versions.get(model.0))
                    .flatten()
                    .copied()
                    .collect();
                return Error::NotFound(format!(
                    "model '{model}' has no version {v}; versions: {have:?}"
                ))
                .because(infermesh_core::Reason::VersionNotFound);
            }
        }
        Error::Unavailable(format!(
            "no ready worker for model '{model}'{what}; workers seen: {workers}"
        ))
    }
}

#[cfg(test)]
mod tests;
