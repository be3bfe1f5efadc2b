//! One watcher for every file a server reloads without a restart: TLS material, the auth
//! file and the JWKS, each held in a [`Reloadable`] that a reload swaps whole.
//!
//! It polls a hash of each entry's file contents, following symlinks: Kubernetes swaps a
//! mounted Secret or ConfigMap by repointing a `..data` symlink, which a per-file inotify
//! watch misses. On a change it calls the entry's reload; when that fails, the last good
//! material stays in use and the failure is logged and counted. Counted in
//! `infermesh_config_reloads_total{file,result}` (result: ok | error).

use std::{
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

/// How often the files are read and hashed.
pub const PERIOD: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub file: String,
    pub result: String,
}

pub type Reloads = Family<ReloadLabels, Counter>;

/// Registers `infermesh_config_reloads_total`.
pub fn register(registry: &mut prometheus_client::registry::Registry) -> Reloads {
    let reloads = Reloads::default();
    registry.register(
        "infermesh_config_reloads",
        "Reloads of watched files (TLS material) by entry and result (ok, error: the last good one stays)",
        reloads.clone(),
    );
    reloads
}

/// Material that a reload swaps whole; each user takes what is current.
#[derive(Debug)]
pub struct Reloadable<T>(RwLock<Arc<T>>);

impl<T: Send + Sync + 'static> Reloadable<T> {
    pub fn new(value: T) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(value))))
    }

    pub fn get(&self) -> Arc<T> {
        self.0.read().expect("reloadable lock").clone()
    }

    /// The watched entry named `name` (the metric's `file` label): when `paths` change,
    /// `load` runs and what it returns becomes current; an error leaves the last good one.
    pub fn watched(
        self: &Arc<Self>,
        name: &str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Watched {
        let me = self.clone();
        Watched {
            name: name.into(),
            paths,
            reload: Box::new(move || {
                let value = load()?;
                *me.0.write().expect("reloadable lock") = Arc::new(value);
                Ok(())
            }),
        }
    }
}

type Reload = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One reloadable thing: its name, its files and how to reload them.
pub struct Watched {
    name: String,
    paths: Vec<PathBuf>,
    reload: Reload,
}

impl Watched {
    /// A hash of the files' contents (a file that cannot be read hashes as its error).
    fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in &self.paths {
            match std::fs::read(p) {
                Ok(bytes) => bytes.hash(&mut h),
                Err(e) => e.kind().hash(&mut h),
            }
        }
        h.finish()
    }
}

/// Stops the watcher when dropped.
pub struct Watching(Option<tokio::task::JoinHandle<()>>);

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Polls `entries` every `period` for as long as the returned guard lives. The material
/// loaded at start is taken as current.
pub fn spawn(entries: Vec<Watched>, period: Duration, reloads: Reloads) -> Watching {
    if entries.is_empty() {
        return Watching(None);
    }
    let mut seen: Vec<u64> = entries.iter().map(Watched::digest).collect();
    Watching(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (entry, last) in entries.iter().zip(seen.iter_mut()) {
                let now = entry.digest();
                if now == *last {
                    continue;
                }
                // Remembered either way: a bad file is reported once, and tried again when
                // it changes.
                *last = now;
                let result = match (entry.reload)() {
                    Ok(()) => {
                        tracing::info!(file = %entry.name, "reloaded");
                        "ok"
                    }
                    Err(e) => {
                        tracing::warn!(file = %entry.name, error = %e, "reload failed; keeping the last good one");
                        "error"
                    }
                };
                reloads
                    .get_or_create(&ReloadLabels {
                        file: entry.name.clone(),
                        result: result.into(),
                    })
                    .inc();
            }
        }
    })))
}
