//! What the gateway does for placed models between requests, once a second: keeps each
//! routing file's `copies.min` loaded (and pinned) on the model's first-ranked workers,
//! adds a copy on the next-ranked worker when a model's copies stay saturated (requests in
//! flight per copy at or above `--placement-copy-inflight` for `--placement-copy-window`),
//! up to `copies.max`, and sets the copies gauge. Every gateway replica computes the same
//! rankings, so replicas that decide alike ask the same worker, which loads once.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::Placer;
use crate::{endpoint::Endpoint, rank};

/// When copies are added for load (`--placement-copy-inflight`, `--placement-copy-window`).
#[derive(Clone, Copy, Debug)]
pub struct Scaling {
    pub inflight: f64,
    pub window: Duration,
}

/// The keeper's memory between ticks.
#[derive(Default)]
pub struct Keeping {
    /// Since when each model's copies have been saturated.
    hot_since: Mutex<HashMap<String, Instant>>,
    /// Loads the keeper asked for and that have not answered: (model, worker).
    asked: Mutex<HashSet<(String, String)>>,
    /// Since when each draining worker has been draining.
    draining_since: Mutex<HashMap<String, Instant>>,
    /// Loads refused or failed, not asked again of the same worker until then.
    backoff: Mutex<HashMap<(String, String), Instant>>,
}

/// How long a (model, worker) whose load the keeper asked for failed is left alone (a
/// worker full of models in use would otherwise be asked every second).
const BACKOFF: Duration = Duration::from_secs(10);

/// One model as the workers' change streams show it.
struct Model<'a> {
    /// Ready placement-mode workers listing it, ranked for it.
    ranked: Vec<&'a Arc<Endpoint>>,
    /// Of those, the ones holding a ready version.
    holders: Vec<&'a Arc<Endpoint>>,
    /// Requests in flight on it, summed over the holders.
    in_flight: u64,
}

impl Placer {
    /// Runs the keeper until the gateway stops.
    pub async fn keep(self: Arc<Self>, every: Duration) {
        loop {
            self.tick();
            tokio::time::sleep(every).await;
        }
    }

    fn tick(self: &Arc<Self>) {
        let all = self.pool.all();
        let placing: Vec<&Arc<Endpoint>> =
            all.iter().filter(|e| e.is_ready() && e.placing()).collect();
        let mut names: Vec<String> = placing
            .iter()
            .flat_map(|e| {
                e.held()
                    .map(|h| h.models.keys().cloned().collect::<Vec<_>>())
            })
            .flatten()
            .collect();
        names.sort();
        names.dedup();
        let table = self.routes.current();
        self.drain(&placing);
        for name in &names {
            let model = survey(name, &placing);
            self.metrics
                .copies
                .get_or_create(&super::metrics::ModelLabels {
                    model: name.clone(),
                })
                .set(model.holders.len() as i64);
            let copies = table.policy(name).copies;
            let min = copies.min as usize;
            // The first `min` of the ranking hold pinned copies.
            for ep in model.ranked.iter().take(min) {
                if !pinned_here(ep, name) && self.ask(ep, name, true) && model.holders.len() < min {
                    super::PlacementMetrics::count(&self.metrics.copies_added, "min");
                }
            }
            self.follow_load(name, &model, copies.max.map_or(usize::MAX, |m| m as usize));
        }
    }

    /// Moves each draining worker's models: a model it alone holds is loaded on the next
    /// worker in its ranking; once none is left (or `--drain-timeout` has passed) the
    /// worker leaves rotation.
    fn drain(self: &Arc<Self>, placing: &[&Arc<Endpoint>]) {
        let mut since = self.keeping.draining_since.lock().expect("keeper lock");
        since.retain(|addr, _| placing.iter().any(|e| e.addr == *addr && e.is_draining()));
        for ep in placing.iter().filter(|e| e.is_draining()) {
            let started = *since.entry(ep.addr.clone()).or_insert_with(Instant::now);
            let held = ep.held().map(|h| h.models.clone()).unwrap_or_default();
            let mut alone = 0;
            for (name, versions) in &held {
                if !versions.iter().any(|v| v.state == "READY") {
                    continue;
                }
                let model = survey(name, placing);
                if model.holders.is_empty() {
                    alone += 1;
                    if let Some(next) = model.ranked.first() {
                        self.ask(next, name, false);
                    }
                }
            }
            let late = started.elapsed() >= self.drain_timeout;
            if alone == 0 || late {
                tracing::info!(worker = %ep.addr, models_left = alone, "draining worker out of rotation");
                ep.mark_unready(match late {
                    false => "draining; its models are held elsewhere".into(),
                    true => format!(
                        "draining; --drain-timeout passed with {alone} models held nowhere else"
                    ),
                });
            }
        }
    }

    /// Adds a copy when the model's copies have been saturated for the whole window.
    fn follow_load(self: &Arc<Self>, name: &str, model: &Model<'_>, max: usize) {
        let copies = model.holders.len();
        let saturated = copies > 0
            && model.in_flight as f64 / copies as f64 >= self.scaling.inflight
            && copies < max;
        let mut hot = self.keeping.hot_since.lock().expect("keeper lock");
        if !saturated {
            hot.remove(name);
            return;
        }
        let now = Instant::now();
        let since = *hot.entry(name.to_string()).or_insert(now);
        if now - since < self.scaling.window {
            return;
        }
        let next = model
            .ranked
            .iter()
            .find(|e| !model.holders.iter().any(|h| h.addr == e.addr));
        if let Some(ep) = next.filter(|ep| self.ask(ep, name, false)) {
            tracing::info!(model = %name, worker = %ep.addr, copies, in_flight = model.in_flight, "copies saturated; loading another");
            super::PlacementMetrics::count(&self.metrics.copies_added, "load");
            // A whole window again before the next one: the new copy takes load first.
            hot.insert(name.to_string(), now);
        }
    }

    /// Asks `ep` to load `name` (pinned or not) in the background, once at a time; false
    /// when such a load is already under way or backing off.
    fn ask(self: &Arc<Self>, ep: &Arc<Endpoint>, name: &str, pin: bool) -> bool {
        let key = (name.to_string(), ep.addr.clone());
        {
            let mut backoff = self.keeping.backoff.lock().expect("keeper lock");
            let now = Instant::now();
            backoff.retain(|_, until| *until > now);
            if backoff.contains_key(&key) {
                return false;
            }
        }
        if !self
            .keeping
            .asked
            .lock()
            .expect("keeper lock")
            .insert(key.clone())
        {
            return false;
        }
        let (me, ep) = (self.clone(), ep.clone());
        tokio::spawn(async move {
            if me.load_on(&ep, &key.0, pin).await.is_err() {
                let until = Instant::now() + BACKOFF;
                me.keeping
                    .backoff
                    .lock()
                    .expect("keeper lock")
                    .insert(key.clone(), until);
            }
            me.keeping.asked.lock().expect("keeper lock").remove(&key);
        });
        true
    }
}

fn survey<'a>(name: &str, placing: &[&'a Arc<Endpoint>]) -> Model<'a> {
    let listing: Vec<&'a Arc<Endpoint>> =
        placing.iter().copied().filter(|e| e.places(name)).collect();
    let addrs: Vec<&str> = listing.iter().map(|e| e.addr.as_str()).collect();
    let ranked: Vec<&'a Arc<Endpoint>> = rank::rank(name, &addrs)
        .into_iter()
        .filter_map(|a| listing.iter().copied().find(|e| e.addr == a))
        .collect();
    let holders: Vec<&'a Arc<Endpoint>> = ranked
        .iter()
        .copied()
        .filter(|e| e.serves(name, None))
        .collect();
    let in_flight = holders
        .iter()
        .filter_map(|e| e.held())
        .map(|h| {
            h.models
                .get(name)
                .into_iter()
                .flatten()
                .map(|v| v.in_flight as u64)
                .sum::<u64>()
        })
        .sum();
    Model {
        ranked,
        holders,
        in_flight,
    }
}

/// Whether `ep` holds `name` ready and pinned.
fn pinned_here(ep: &Endpoint, name: &str) -> bool {
    ep.held().is_some_and(|h| {
        h.models
            .get(name)
            .is_some_and(|vs| vs.iter().any(|v| v.state == "READY" && v.pinned))
    })
}
