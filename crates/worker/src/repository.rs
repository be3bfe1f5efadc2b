//! The model repository in Triton's layout: `<root>/<model>/<version>/model.onnx`.
//! Every model is loaded at start; one that fails is reported with its reason and never
//! stops the others.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use infermesh_core::{text::clip, Error as RequestError};
use infermesh_proto as pb;

use crate::{metrics::WorkerMetrics, model::Model, model_config, Error};

/// The state of one model version, as RepositoryIndex reports it.
#[derive(Clone)]
pub enum State {
    Loading,
    Ready(Arc<Model>),
    Failed(String),
    /// Unloaded on request or because its files went away; requests in flight finish.
    Unloaded,
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Loading => "LOADING",
            State::Ready(_) => "READY",
            State::Failed(_) | State::Unloaded => "UNAVAILABLE",
        }
    }
}

/// Versions of one model; `None` as key means "no usable version directory".
type Versions = BTreeMap<Option<i64>, State>;

pub struct Repository {
    root: PathBuf,
    metrics: WorkerMetrics,
    /// Written on load/unload, read on every request; requests clone the `Arc<Model>` and
    /// drop the lock before awaiting.
    models: RwLock<BTreeMap<String, Versions>>,
    /// The response cache: a model's entries go whenever its state changes (loaded
    /// again, unloaded, failed).
    cache: Option<Arc<crate::cache::ResponseCache>>,
    /// Every version's statistics since the process started, across unloads and loads.
    stats: std::sync::Mutex<BTreeMap<(String, i64), Arc<crate::stats::Stats>>>,
    /// The name of each model whose state changed, for the placement API's stream.
    changes: tokio::sync::broadcast::Sender<String>,
}

/// One model directory found on disk.
pub struct Found {
    pub name: String,
    /// Its config.pbtxt, if any, and the version directories its version policy serves.
    pub plan: Result<Plan, String>,
}

/// What to load for one model: its config.pbtxt, if any, and the version directories its
/// version policy serves.
pub struct Plan {
    pub config: Option<pb::ModelConfig>,
    pub versions: Vec<(i64, PathBuf)>,
}

impl Repository {
    pub fn new(
        root: PathBuf,
        metrics: WorkerMetrics,
        cache: Option<Arc<crate::cache::ResponseCache>>,
    ) -> Self {
        Self {
            root,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            cache,
            stats: Default::default(),
            changes: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// Names of models as their states change (a receiver that falls behind is told so).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// The statistics of `name` `version`, made by `make` the first time.
    pub fn stats_for(
        &self,
        name: &str,
        version: i64,
        make: impl FnOnce() -> crate::stats::Stats,
    ) -> Arc<crate::stats::Stats> {
        self.stats
            .lock()
            .expect("repository lock")
            .entry((name.to_string(), version))
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Lists model directories under the root.
    pub fn scan(&self) -> Result<Vec<Found>, Error> {
        let entries = std::fs::read_dir(&self.root).map_err(|e| {
            Error::Startup(format!(
                "cannot read model repository {}: {e}",
                self.root.display()
            ))
        })?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !path.is_dir() || name.starts_with('.') {
                continue;
            }
            found.push(Found {
                name: name.to_string(),
                plan: plan(&path),
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// The versions (with states) recorded for a model.
    pub fn versions(&self, name: &str) -> Vec<Option<i64>> {
        let models = self.models.read().expect("repository lock");
        models
            .get(name)
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The versions of `name` that are READY now.
    pub fn ready_versions(&self, name: &str) -> Vec<i64> {
        let models = self.models.read().expect("repository lock");
        models
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|(v, s)| matches!(s, State::Ready(_)).then_some(*v).flatten())
            .collect()
    }

    /// Every model name recorded.
    pub fn names(&self) -> Vec<String> {
        self.models
            .read()
            .expect("repository lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Forgets one version entry (e.g. the "no version directory" placeholder).
    pub fn forget(&self, name: &str, version: Option<i64>) {
        let mut models = self.models.write().expect("repository lock");
        if let Some(v) = models.get_mut(name) {
            v.remove(&version);
        }
    }

    /// Reads one model directory for a Load request: `name` must be one path component
    /// (checked by the caller) whose directory, symlinks resolved, lies inside the
    /// repository. `None` alike for missing, not a directory, or outside.
    pub fn scan_one(&self, name: &str) -> Option<Found> {
        let root = self.root.canonicalize().ok()?;
        let path = root.join(name).canonicalize().ok()?;
        (path.starts_with(&root) && path != root && path.is_dir()).then(|| Found {
            name: name.to_string(),
            plan: plan(&path),
        })
    }

    /// Models with at least one version loaded or loading (what `--max-models` counts).
    pub fn loaded_count(&self) -> usize {
        let models = self.models.read().expect("repository lock");
        models
            .values()
            .filter(|v| {
                v.values()
                    .any(|s| matches!(s, State::Ready(_) | State::Loading))
            })
            .count()
    }

    pub fn set(&self, name: &str, version: Option<i64>, state: State) {
        self.metrics.set_state(name, version, state.label());
        if let Some(cache) = &self.cache {
            cache.clear_model(name);
        }
        {
            let mut models = self.models.write().expect("repository lock");
            models
                .entry(name.to_string())
                .or_default()
                .insert(version, state);
        }
        let _ = self.changes.send(name.to_string());
    }

    /// Tells change followers that something of `name` besides its state changed (a pin).
    pub fn announce(&self, name: &str) {
        let _ = self.changes.send(name.to_string());
    }

    /// Whether a model of this name was found (in any state).
    pub fn knows(&self, name: &str) -> bool {
        self.models
            .read()
            .expect("repository lock")
            .contains_key(name)
    }

    /// The model serving `version` ("" = newest ready).
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<Model>, RequestError> {
        let models = self.models.read().expect("repository lock");
        let Some(versions) = models.get(name) else {
            let known = models.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(RequestError::NotFound(format!(
                "unknown model '{}'; this server has: {known}",
                clip(name)
            )));
        };
        let state = if version.is_empty() {
            versions
                .values()
                .rev()
                .find(|s| matches!(s, State::Ready(_)))
                .or_else(|| versions.values().next_back())
        } else {
            let v: i64 = version.parse().map_err(|_| {
                RequestError::InvalidArgument(format!(
                    "model '{name}': version '{}' is not a number",
                    clip(version)
                ))
            })?;
            versions.get(&Some(v))
        };
        match state {
            Some(State::Ready(m)) => Ok(m.clone()),
            Some(State::Loading) => Err(RequestError::Unavailable(format!(
                "model '{name}' is still loading"
            ))),
            Some(State::Failed(reason)) => Err(RequestError::Unavailable(format!(
                "model '{name}' is not ready: {reason}"
            ))),
            Some(State::Unloaded) => Err(RequestError::Unavailable(format!(
                "model '{name}' is unloaded"
            ))),
            None => {
                let have = versions
                    .keys()
                    .flatten()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(RequestError::NotFound(format!(
                    "model '{name}' has no version {version}; versions: {have}"
                ))
                .because(infermesh_core::Reason::VersionNotFound))
            }
        }
    }

    /// Every model version with its state, for RepositoryIndex.
    pub fn index(&self) -> Vec<pb::repository_index_response::ModelIndex> {
        let models = self.models.read().expect("repository lock");
        models
            .iter()
            .flat_map(|(name, versions)| {
                versions.iter().map(
                    move |(v, state)| pb::repository_index_response::ModelIndex {
                        name: name.clone(),
                        version: v.map(|v| v.to_string()).unwrap_or_default(),
                        state: state.label().into(),
                        reason: match state {
                            State::Failed(r) => r.clone(),
                            State::Unloaded => "unloaded".into(),
                            _ => String::new(),
                        },
                    },
                )
            })
            .collect()
    }

    /// Whether at least one model version is READY.
    pub fn any_ready(&self) -> bool {
        let models = self.models.read().expect("repository lock");
        models
            .values()
            .flat_map(|v| v.values())
            .any(|s| matches!(s, State::Ready(_)))
    }

    pub fn ready_models(&self) -> Vec<Arc<Model>> {
        let models = self.models.read().expect("repository lock");
        models
            .values()
            .flat_map(|v| v.values())
            .filter_map(|s| match s {
                State::Ready(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Reads a model directory: its config (if any) and the versions its policy selects
/// (Triton's default: the newest one).
pub fn plan(model_dir: &Path) -> Result<Plan, String> {
    let config = model_config::read(model_dir).map_err(|e| e.to_string())?;
    let entries = std::fs::read_dir(model_dir)
        .map_err(|e| format!("cannot read {}: {e}", model_dir.display()))?;
    let mut versions: Vec<(i64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let v: i64 = e.file_name().to_str()?.parse().ok()?;
            (v >= 0 && e.path().is_dir()).then(|| (v, e.path()))
        })
        .collect();
    versions.sort();
    if versions.is_empty() {
        return Err(format!(
            "no version directory under {} (expected <model>/<version>/model.onnx)",
            model_dir.display()
        ));
    }
    use pb::model_version_policy::PolicyChoice;
    let policy = config
        .as_ref()
        .and_then(|c| c.version_policy.as_ref())
        .and_then(|p| p.policy_choice.as_ref());
    let chosen: Vec<(i64, PathBuf)> = match policy {
        None => versions.split_off(versions.len() - 1),
        Some(PolicyChoice::Latest(l)) => {
            let n = (l.num_versions.max(1) as usize).min(versions.len());
            versions.split_off(versions.len() - n)
        }
        Some(PolicyChoice::All(_)) => versions,
        Some(PolicyChoice::Specific(s)) => {
            if let Some(missing) = s
                .versions
                .iter()
                .find(|v| !versions.iter().any(|(have, _)| have == *v))
            {
                return Err(format!(
                    "version_policy: specific version {missing} has no directory"
                ));
            }
            versions
                .into_iter()
                .filter(|(v, _)| s.versions.contains(v))
                .collect()
        }
    };
    Ok(Plan {
        config,
        versions: chosen,
    })
}
