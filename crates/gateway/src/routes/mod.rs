//! The routing file (`--routes`): per model, a weighted split over versions for requests
//! that name none, and hedging. Read at start (a file that does not parse stops the
//! gateway, naming the line and field) and reloaded by the shared watcher when its content
//! changes and has settled; a bad reload is logged and counted, the last good policy
//! kept. Each request takes the table in force when it arrives, without a lock.

pub mod file;
pub mod rules;
pub mod split;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use infermesh_core::watch::{Reloadable, Watched};
use prometheus_client::metrics::counter::Counter;

use crate::{
    guard::{self, Guard},
    metrics::{
        GatewayMetrics, HedgeLabels, RollbackLabels, ShadowLabels, ShadowTargetLabels, SplitLabels,
    },
    route::Policy,
    shadow::{self, Stats},
};
pub use file::After;
use split::Split;

/// One model's counts for `infermesh routes`, kept across reloads.
#[derive(Debug, Default)]
pub struct Counts {
    /// Requests routed under a hedge rule.
    pub requests: AtomicU64,
    /// Hedged copies sent.
    pub hedged: AtomicU64,
    /// Hedged copies whose answer was used.
    pub won: AtomicU64,
}

/// A model's metric handles, resolved when its policy is built.
#[derive(Debug, Default)]
pub struct Records {
    /// For each version of the split, in its order: routed, fallback, unavailable.
    pub split: Vec<[Counter; 3]>,
    pub hedge_won: Counter,
    pub hedge_lost: Counter,
    pub counts: Arc<Counts>,
}

/// The routing policy of every model, as one file said.
pub struct Table {
    models: HashMap<String, Arc<Policy>>,
    default: Arc<Policy>,
}

impl Table {
    /// The policy of `model`: its entry, else the default (as without a routing file).
    pub fn policy(&self, model: &str) -> &Arc<Policy> {
        self.models.get(model).unwrap_or(&self.default)
    }

    /// The models with an entry, by name.
    pub fn models(&self) -> Vec<(&String, &Arc<Policy>)> {
        let mut all: Vec<_> = self.models.iter().collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }
}

/// The live routing table and what builds it.
pub struct Routes {
    pub path: Option<PathBuf>,
    table: Arc<Reloadable<Table>>,
    metrics: GatewayMetrics,
    counts: Mutex<HashMap<String, Arc<Counts>>>,
    /// Shadow results by (model, target), kept across reloads.
    shadows: Mutex<HashMap<(String, String), Arc<Stats>>>,
    /// Each model's entry as last read and the policy built from it: an entry that did not
    /// change keeps its policy (its guard's window, a version it took out of the split).
    built: Mutex<HashMap<String, (file::Entry, Arc<Policy>)>>,
}

impl Routes {
    /// Reads `path` (None: every model has the default policy). An error names the file.
    pub fn load(path: Option<PathBuf>, metrics: GatewayMetrics) -> Result<Arc<Self>, String> {
        let routes = Self {
            path,
            table: Reloadable::new(Table {
                models: HashMap::new(),
                default: Default::default(),
            }),
            metrics,
            counts: Default::default(),
            shadows: Default::default(),
            built: Default::default(),
        };
        if routes.path.is_some() {
            let table = routes.read()?;
            routes.table.replace(table);
        }
        Ok(Arc::new(routes))
    }

    /// The table in force.
    pub fn current(&self) -> Arc<Table> {
        self.table.get()
    }

    /// Changed files loaded since start (the first load is not one).
    pub fn reloads(&self) -> u64 {
        self.table.generation().saturating_sub(1)
    }

    /// Reloads of the file, for the shared watcher.
    pub fn watched(self: &Arc<Self>) -> Option<Watched> {
        let path = self.path.clone()?;
        let me = self.clone();
        Some(self.table.watched("routes", vec![path], move || me.read()))
    }

    fn read(&self) -> Result<Table, String> {
        let path = self.path.as_ref().expect("a routes file");
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--routes {}: {e}", path.display()))?;
        let file = file::parse(&text).map_err(|e| format!("--routes {}: {e}", path.display()))?;
        Ok(self.build(file))
    }

    fn build(&self, file: file::File) -> Table {
        let mut built = self.built.lock().expect("routes lock");
        let models: HashMap<String, Arc<Policy>> = file
            .models
            .into_iter()
            .map(|(model, entry)| {
                let policy = match built.get(&model) {
                    Some((before, policy)) if *before == entry => policy.clone(),
                    _ => Arc::new(self.policy(&model, entry.clone())),
                };
                built.insert(model.clone(), (entry, policy.clone()));
                (model, policy)
            })
            .collect();
        built.retain(|m, _| models.contains_key(m));
        Table {
            models,
            default: Default::default(),
        }
    }

    /// A model's policy; its metric series are made here, so dashboards show them at 0
    /// before the first request.
    fn policy(&self, model: &str, entry: file::Entry) -> Policy {
        let counts = self
            .counts
            .lock()
            .expect("routes lock")
            .entry(model.to_string())
            .or_default()
            .clone();
        let split = entry
            .split
            .map(|w| Split::new(w.into_iter().collect(), entry.fallback));
        let m = &self.metrics;
        let series = |version: i64, result: &str| {
            m.split
                .get_or_create(&SplitLabels {
                    model: model.into(),
                    version: version.to_string(),
                    result: result.into(),
                })
                .clone()
        };
        let hedge = |result: &str| {
            m.hedges
                .get_or_create(&HedgeLabels {
                    model: model.into(),
                    result: result.into(),
                })
                .clone()
        };
        let records = Records {
            split: split
                .iter()
                .flat_map(|s| &s.weights)
                .map(|(v, _)| {
                    [
                        series(*v, "routed"),
                        series(*v, "fallback"),
                        series(*v, "unavailable"),
                    ]
                })
                .collect(),
            hedge_won: if entry.hedge.is_some() {
                hedge("won")
            } else {
                Counter::default()
            },
            hedge_lost: if entry.hedge.is_some() {
                hedge("lost")
            } else {
                Counter::default()
            },
            counts,
        };
        Policy {
            split,
            hedge: entry.hedge,
            shadow: entry.shadow.map(|rule| self.shadow(model, rule)),
            guard: entry.guard.map(|rule| self.guard(model, rule)),
            copies: entry.copies.unwrap_or_default(),
            records,
            ..Default::default()
        }
    }

    fn shadow(&self, model: &str, rule: rules::Shadow) -> shadow::Rule {
        let target = rule.label(model);
        let stats = self
            .shadows
            .lock()
            .expect("routes lock")
            .entry((model.to_string(), target.clone()))
            .or_insert_with(|| {
                let m = &self.metrics;
                let labels = ShadowTargetLabels {
                    model: model.into(),
                    target: target.clone(),
                };
                let result = |result: &str| {
                    m.shadow
                        .get_or_create(&ShadowLabels {
                            model: model.into(),
                            target: target.clone(),
                            result: result.into(),
                        })
                        .clone()
                };
                Arc::new(Stats::new(
                    model,
                    shadow::record::RESULTS.map(result),
                    m.shadow_abs_error.get_or_create(&labels).clone(),
                    m.shadow_cosine.get_or_create(&labels).clone(),
                ))
            })
            .clone();
        shadow::Rule::new(rule, target, stats)
    }

    fn guard(&self, model: &str, rule: rules::Guard) -> Guard {
        let series =
            |family: &prometheus_client::metrics::family::Family<RollbackLabels, Counter>| {
                guard::WHYS.map(|why| {
                    family
                        .get_or_create(&RollbackLabels {
                            model: model.into(),
                            version: rule.version.to_string(),
                            why: why.into(),
                        })
                        .clone()
                })
            };
        let (rollbacks, withheld) = (
            series(&self.metrics.rollbacks),
            series(&self.metrics.rollbacks_withheld),
        );
        Guard::new(model, rule, rollbacks, withheld)
    }
}
