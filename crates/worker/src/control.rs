//! Model control as in Triton: `none` loads everything at start and refuses Load/Unload;
//! `explicit` loads what `--load-model` names and then what RepositoryModelLoad asks for;
//! `poll` also rescans the repository and picks up added, changed and removed versions.
//! A version being replaced keeps serving the requests it already has (they hold it).
//!
//! An update never takes down what serves (Triton's rule for reloads): a new version or a
//! changed config that fails to load leaves the versions that were serving in service,
//! and an old version leaves only once every version the policy selects is READY. In poll
//! mode a model directory is loaded only once it has settled (two polls read the same
//! files: names, sizes and modification times), so a copy in progress is never read
//! half-way; a failed load is tried again when its files change, not in a loop.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use infermesh_core::{model_control::check_name, Error as RequestError, Lifecycle};

use crate::{
    model::{Defaults, LoadOptions, Model},
    placement::{
        gate::{Gate, Priority},
        memory, Placement,
    },
    repository::{Found, Plan, Repository, State},
    stats::Stats,
    Error,
};

mod placed;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelControlMode {
    None,
    Explicit,
    Poll,
    Placement,
}

/// What a model looked like on disk when it was last loaded, to tell whether it changed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Stamp {
    config: Option<Vec<u8>>,
    /// Every file of every version directory: its size and modification time (model
    /// files may be large; their bytes are not read on every poll).
    versions: BTreeMap<String, BTreeMap<String, Option<(SystemTime, u64)>>>,
}

fn stamp(dir: &Path) -> Stamp {
    let config = std::fs::read(dir.join("config.pbtxt")).ok();
    let versions = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let files = std::fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|f| {
                    // Following symlinks: a ConfigMap-style swap changes what they point at.
                    let meta = std::fs::metadata(f.path()).ok();
                    let key = f.file_name().to_string_lossy().into_owned();
                    (key, meta.and_then(|m| Some((m.modified().ok()?, m.len()))))
                })
                .collect();
            (e.file_name().to_string_lossy().into_owned(), files)
        })
        .collect();
    Stamp { config, versions }
}

pub struct Control {
    pub repo: Arc<Repository>,
    pub mode: ModelControlMode,
    defaults: Defaults,
    lifecycle: Lifecycle,
    /// `--max-models`: 0 = no cap.
    max_models: usize,
    /// `--allow-empty-repository`: SERVING with no model ready.
    allow_empty: bool,
    /// Set once the models named at start have been tried; until then "" stays
    /// NOT_SERVING so a worker takes traffic only with its whole start set.
    started: std::sync::atomic::AtomicBool,
    stamps: tokio::sync::Mutex<BTreeMap<String, Stamp>>,
    /// Poll mode: a changed model directory as the last poll saw it, loaded once the next
    /// poll sees the same (the settle rule).
    settling: tokio::sync::Mutex<BTreeMap<String, Stamp>>,
    /// Placement mode: capacity, measured sizes, pins, loads under way.
    placement: Option<Arc<Placement>>,
    /// One load at a time, asked-for ones first (placement's measurements need the first).
    gate: Gate,
}

impl Control {
    pub fn new(
        repo: Arc<Repository>,
        mode: ModelControlMode,
        defaults: Defaults,
        lifecycle: Lifecycle,
        max_models: usize,
        allow_empty: bool,
        placement: Option<Arc<Placement>>,
    ) -> Self {
        Self {
            repo,
            mode,
            defaults,
            lifecycle,
            max_models,
            allow_empty,
            started: Default::default(),
            stamps: Default::default(),
            settling: Default::default(),
            placement,
            gate: Gate::default(),
        }
    }

    /// Whether the worker should take traffic: the start set has been tried and a model
    /// is READY (or `--allow-empty-repository`). A worker that can serve nothing must not
    /// be in a Service's endpoints.
    pub fn can_serve(&self) -> bool {
        // A placement worker with nothing loaded is ready to be given models.
        self.started.load(std::sync::atomic::Ordering::SeqCst)
            && (self.allow_empty || self.placement.is_some() || self.repo.any_ready())
    }

    /// Marks the start set as tried and publishes overall health.
    pub async fn started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.publish_overall().await;
    }

    /// Overall ("") health follows what is READY: a later load can make an idle worker
    /// SERVING, an unload of its last model NOT_SERVING.
    async fn publish_overall(&self) {
        if self.started.load(std::sync::atomic::Ordering::SeqCst) {
            self.lifecycle.set("", self.can_serve()).await;
        }
    }

    /// Loads what the mode says to load at start: everything, or (explicit) the names
    /// given (`*` for everything).
    pub async fn initial(&self, load: &[String]) -> Result<(), Error> {
        let found = self.repo.scan()?;
        let named = matches!(
            self.mode,
            ModelControlMode::Explicit | ModelControlMode::Placement
        );
        let all = !named || load.iter().any(|n| n == "*");
        for f in found {
            if all || load.contains(&f.name) {
                if let Some(p) = &self.placement {
                    p.pin(&f.name);
                }
                let _ = self.reload(f, Priority::Background).await;
            } else {
                // Listed in RepositoryIndex (so clients can discover it), not loaded.
                self.repo.set(&f.name, None, State::Unloaded);
            }
        }
        Ok(())
    }

    /// RepositoryModelLoad: (re)loads a model from disk. New versions serve before old ones
    /// leave; versions the policy no longer selects are unloaded after their requests.
    /// The name is one path component inside the repository (checked before the file
    /// system is touched); missing, not a directory and outside all answer the same.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<(), Error> {
        if self.placement.is_some() {
            return self.place(name).await;
        }
        self.allowed()?;
        check_name(name)?;
        let found = self.repo.scan_one(name).ok_or_else(|| {
            RequestError::NotFound(format!(
                "model_name '{name}': no such model directory in the model repository"
            ))
        })?;
        self.under_max_models(name)?;
        self.reload(found, Priority::Request).await
    }

    /// The `infermesh_pin` load parameter (placement mode): true pins the model once
    /// loaded (never evicted, an Unload refused), false takes such a pin off again. A
    /// gateway pins the copies a routing file's `copies.min` asks for.
    pub fn set_pinned(&self, name: &str, pin: bool) -> Result<(), Error> {
        let Some(p) = &self.placement else {
            return Err(RequestError::InvalidArgument(format!(
                "parameter '{PIN}' applies in --model-control-mode placement only"
            ))
            .into());
        };
        p.pin_asked(name, pin);
        self.repo.announce(name);
        Ok(())
    }

    /// `--max-models`: a load of one more model beyond it is refused.
    fn under_max_models(&self, name: &str) -> Result<(), Error> {
        let loaded = self.repo.get(name, "").is_ok();
        let count = self.repo.loaded_count();
        if self.max_models > 0 && !loaded && count >= self.max_models {
            return Err(RequestError::ResourceExhausted(format!(
                "model_name '{name}': {count} models are loaded, the most this worker allows (--max-models {}); unload one first",
                self.max_models
            ))
            .because(infermesh_core::Reason::OverBudget)
            .into());
        }
        Ok(())
    }

    /// RepositoryModelUnload: every version stops taking requests; those in flight finish.
    pub async fn unload(&self, name: &str) -> Result<(), Error> {
        self.allowed()?;
        check_name(name)?;
        if !self.repo.knows(name) {
            return Err(RequestError::NotFound(format!("unknown model '{name}'")).into());
        }
        if self.placement.as_ref().is_some_and(|p| p.is_pinned(name)) {
            return Err(RequestError::FailedPrecondition(format!(
                "model '{name}' is pinned (--load-model at start in placement mode, or a load with {PIN} true): it stays loaded"
            ))
            .into());
        }
        let mut stamps = self.stamps.lock().await;
        self.unload_all(name).await;
        stamps.remove(name);
        Ok(())
    }

    /// Poll mode: rescans every `interval` until the process ends.
    pub async fn poll(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.poll_once().await {
                // Models already loaded keep serving: a repository on a network volume
                // that blinks must not take a healthy worker out of rotation.
                self.defaults.metrics.repository_poll_failures.inc();
                tracing::warn!(error = %e, "repository poll failed; loaded models keep serving");
            }
        }
    }

    /// One rescan: loads new or changed models once they have settled, unloads models
    /// whose directory is gone.
    pub async fn poll_once(&self) -> Result<(), Error> {
        let found = self.repo.scan()?;
        let on_disk: Vec<String> = found.iter().map(|f| f.name.clone()).collect();
        for f in found {
            let now = stamp(&self.repo.root().join(&f.name));
            if self.stamps.lock().await.get(&f.name) == Some(&now) {
                self.settling.lock().await.remove(&f.name);
                continue;
            }
            // Changed: load it only once the next poll reads the same files.
            let settled = {
                let mut settling = self.settling.lock().await;
                let settled = settling.get(&f.name) == Some(&now);
                if settled {
                    settling.remove(&f.name);
                } else {
                    settling.insert(f.name.clone(), now);
                }
                settled
            };
            if settled {
                tracing::info!(model = %f.name, "model changed on disk; reloading");
                let _ = self.reload(f, Priority::Background).await;
            }
        }
        for name in self.repo.names() {
            let loaded = self.repo.versions(&name).iter().any(|v| v.is_some());
            if !on_disk.contains(&name) && loaded {
                tracing::info!(model = %name, "model directory removed; unloading");
                let mut stamps = self.stamps.lock().await;
                self.unload_all(&name).await;
                stamps.remove(&name);
            }
        }
        Ok(())
    }

    fn allowed(&self) -> Result<(), Error> {
        if self.mode == ModelControlMode::None {
            return Err(RequestError::FailedPrecondition(
                "model load/unload is not allowed: the worker runs with --model-control-mode none (use explicit, poll or placement)"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    async fn reload(&self, found: Found, priority: Priority) -> Result<(), Error> {
        let _turn = self.gate.turn(priority).await;
        self.reload_in_turn(found).await
    }

    /// `reload` for a caller that holds the gate's turn.
    async fn reload_in_turn(&self, found: Found) -> Result<(), Error> {
        // One model operation at a time: loads are rare and must not interleave.
        let mut stamps = self.stamps.lock().await;
        let name = found.name.clone();
        let disk = stamp(&self.repo.root().join(&name));
        let result = self.load_versions(found).await;
        stamps.insert(name.clone(), disk);
        self.lifecycle
            .set(&name, self.repo.get(&name, "").is_ok())
            .await;
        self.publish_overall().await;
        result
    }

    async fn load_versions(&self, found: Found) -> Result<(), Error> {
        let name = found.name;
        let serving = self.repo.ready_versions(&name);
        let Plan { config, versions } = match found.plan {
            Ok(p) => p,
            Err(reason) if !serving.is_empty() => {
                // A changed config that does not load: what serves stays in service, and
                // the failure is reported on the model's own entry.
                self.update_failed(&name, &serving, &reason);
                return Err(Error::Load(reason));
            }
            Err(reason) => {
                tracing::error!(model = %name, %reason, "model failed to load");
                self.defaults.metrics.update_failures.inc();
                self.repo.set(&name, None, State::Failed(reason.clone()));
                return Err(Error::Load(reason));
            }
        };
        self.repo.forget(&name, None);
        let mut first_error = None;
        for (version, path) in &versions {
            let version = *version;
            if self.repo.get(&name, &version.to_string()).is_err() {
                self.repo.set(&name, Some(version), State::Loading);
            }
            let metrics = &self.defaults.metrics;
            let opts = LoadOptions {
                name: name.clone(),
                version,
                path: path.clone(),
                config: config.clone(),
                defaults: self.defaults.clone(),
                stats: Some(
                    self.repo
                        .stats_for(&name, version, || Stats::new(metrics.model(&name, version))),
                ),
            };
            // Loads run one at a time (the gate, then the stamps lock): what the resident
            // set grows by is this load's.
            let (before, started) = (memory::Held::now(), std::time::Instant::now());
            let device_before = self.placement.as_ref().and_then(|p| p.device_used());
            let result = tokio::task::spawn_blocking(move || Model::load(&opts))
                .await
                .unwrap_or_else(|e| Err(Error::Load(format!("loader panicked: {e}"))));
            let grown = before.grown_since();
            metrics.placement.loaded(result.is_ok(), started.elapsed());
            match result {
                Ok(model) => {
                    metrics
                        .placement
                        .model_bytes(&name, version)
                        .set(grown as i64);
                    if let Some(p) = &self.placement {
                        let on_gpu = model
                            .providers
                            .iter()
                            .any(|p| matches!(p, crate::engine::Provider::Cuda(_)));
                        let device = device_before
                            .filter(|_| on_gpu)
                            .and_then(|b| Some(p.device_used()?.saturating_sub(b)));
                        let files = memory::files_size(path);
                        p.measured(&name, version, (grown, device), files, started.elapsed());
                    }
                    tracing::info!(model = %name, version, providers = ?model.providers, memory_bytes = grown, "model ready");
                    self.repo
                        .set(&name, Some(version), State::Ready(Arc::new(model)));
                }
                Err(e) if serving.contains(&version) => {
                    // A serving version whose files changed into something that does not
                    // load: the loaded one stays.
                    self.update_failed(&name, &serving, &e.to_string());
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    tracing::error!(model = %name, version, reason = %e, "model failed to load");
                    self.defaults.metrics.update_failures.inc();
                    self.repo
                        .set(&name, Some(version), State::Failed(e.to_string()));
                    first_error.get_or_insert(e);
                }
            }
        }
        // Versions the policy no longer selects (or whose directory went away) leave, but
        // a serving one only once every selected version is READY.
        for v in self.repo.versions(&name).into_iter().flatten() {
            if versions.iter().any(|(keep, _)| *keep == v) {
                continue;
            }
            if first_error.is_some() && serving.contains(&v) {
                tracing::warn!(model = %name, version = v, "kept serving: the version that would replace it failed to load");
                continue;
            }
            self.repo.set(&name, Some(v), State::Unloaded);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// An update of a serving model failed: logged once, counted, and reported in
    /// RepositoryIndex on the model's own entry (version ""), while `serving` stays.
    fn update_failed(&self, name: &str, serving: &[i64], reason: &str) {
        tracing::error!(model = %name, ?serving, %reason, "model update failed to load; the versions that were serving stay in service");
        self.defaults.metrics.update_failures.inc();
        self.repo.set(
            name,
            None,
            State::Failed(format!(
                "update failed to load; versions {serving:?} stay in service: {reason}"
            )),
        );
    }

    async fn unload_all(&self, name: &str) {
        for v in self.repo.versions(name) {
            self.repo.set(name, v, State::Unloaded);
        }
        self.lifecycle.set(name, false).await;
        self.publish_overall().await;
        tracing::info!(model = %name, "model unloaded");
    }
}

/// The load parameter that pins a model in placement mode.
pub const PIN: &str = "infermesh_pin";

/// Reads `infermesh_pin` from a load's parameters: None when absent.
pub fn pin_parameter(
    parameters: &std::collections::HashMap<String, infermesh_proto::ModelRepositoryParameter>,
) -> Result<Option<bool>, RequestError> {
    use infermesh_proto::model_repository_parameter::ParameterChoice;
    match parameters.get(PIN).map(|p| &p.parameter_choice) {
        None => Ok(None),
        Some(Some(ParameterChoice::BoolParam(b))) => Ok(Some(*b)),
        Some(other) => Err(RequestError::InvalidArgument(format!(
            "parameter '{PIN}': expected a bool, found {}",
            match other {
                Some(ParameterChoice::Int64Param(_)) => "an int64",
                Some(ParameterChoice::StringParam(_)) => "a string",
                Some(ParameterChoice::BytesParam(_)) => "bytes",
                _ => "nothing",
            }
        ))),
    }
}
