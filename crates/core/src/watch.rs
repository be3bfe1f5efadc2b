//! One watcher for every file a server reloads without a restart: TLS material, the auth
//! file and the JWKS, each held in a [`Reloadable`] that a reload swaps whole.
//!
//! It polls a hash of each entry's file contents, following symlinks: Kubernetes swaps a
//! mounted Secret or ConfigMap by repointing a `..data` symlink, which a per-file inotify
//! watch misses.
//!
//! The settle rule, the same for every file: a change is applied only once two polls in a
//! row read identical bytes, and only if it loads and validates completely (a file still
//! being written is never taken half-way, even when its first half parses); the bytes are
//! read again after loading, and a file that changed meanwhile waits for the next poll.
//! When loading fails, the last good material stays in use and the failure is logged and
//! counted. Counted in `infermesh_config_reloads_total{file,result}` (result: ok | error).

use std::{
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
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

/// Material that a reload swaps whole; each user takes what is current, without a lock.
#[derive(Debug)]
pub struct Reloadable<T> {
    value: arc_swap::ArcSwap<T>,
    /// Counts swaps: a holder of something derived from the value (a stream's tenant)
    /// looks again only when it moved.
    generation: AtomicU64,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    pub fn new(value: T) -> Arc<Self> {
        Arc::new(Self {
            value: arc_swap::ArcSwap::from_pointee(value),
            generation: AtomicU64::new(0),
        })
    }

    pub fn get(&self) -> Arc<T> {
        self.value.load_full()
    }

    /// How many times the value was swapped.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes `value` current (a value loaded outside the watcher, e.g. at start).
    pub fn replace(&self, value: T) {
        self.set(value);
    }

    fn set(&self, value: T) {
        self.value.store(Arc::new(value));
        self.generation.fetch_add(1, Ordering::Release);
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
                let me = me.clone();
                Ok(Box::new(move || me.set(value)) as Commit)
            }),
        }
    }
}

/// Makes a loaded value current.
type Commit = Box<dyn FnOnce() + Send>;
/// Loads and validates; what it returns applies the result.
type Reload = Box<dyn Fn() -> Result<Commit, String> + Send + Sync>;

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
    let mut states: Vec<Settle> = entries
        .iter()
        .map(|e| Settle {
            applied: e.digest(),
            pending: None,
        })
        .collect();
    Watching(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (entry, state) in entries.iter().zip(states.iter_mut()) {
                let Some(result) = state.poll(entry) else {
                    continue;
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

/// Where one entry is in the settle rule.
struct Settle {
    /// The bytes last applied, or last refused (a bad file is reported once, and tried
    /// again when it changes).
    applied: u64,
    /// Changed bytes seen by the last poll, not yet read twice.
    pending: Option<u64>,
}

impl Settle {
    /// One poll: "ok" or "error" when a settled change was tried, None otherwise.
    fn poll(&mut self, entry: &Watched) -> Option<&'static str> {
        let now = entry.digest();
        if now == self.applied {
            self.pending = None;
            return None;
        }
        if self.pending != Some(now) {
            self.pending = Some(now); // changed, or still changing: read it again next time
            return None;
        }
        let loaded = (entry.reload)();
        if loaded.is_ok() && entry.digest() != now {
            self.pending = None; // written again while it was loaded: wait for it
            return None;
        }
        self.pending = None;
        self.applied = now;
        Some(match loaded {
            Ok(commit) => {
                commit();
                tracing::info!(file = %entry.name, "reloaded");
                "ok"
            }
            Err(e) => {
                tracing::warn!(file = %entry.name, error = %e, "reload failed; keeping the last good one");
                "error"
            }
        })
    }
}

#[cfg(test)]
mod tests;
