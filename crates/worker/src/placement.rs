//! `--model-control-mode placement`: models load when asked (RepositoryModelLoad, which a
//! gateway sends when it places a model here) within a memory capacity for models
//! (`--model-memory-bytes`), least recently used ones evicted to make room; `--load-model`
//! names load at start and are pinned (never evicted). What each load takes is measured
//! (the resident set before and after it: one load at a time, see [`gate`]), kept per
//! model and version across unloads, and used as the next estimate; a version never
//! loaded is estimated from its files.

pub mod device;
pub mod gate;
pub mod memory;
mod metrics;
pub mod watch;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use futures::future::{BoxFuture, Shared};

pub use metrics::PlacementMetrics;

use crate::Error;

/// The memory bound for models when `--model-memory-bytes` is not given: this share of
/// the cgroup's memory limit (or the host's memory), leaving the rest for requests in
/// flight (`--max-inflight-bytes`), answers and the runtime itself.
pub const DEFAULT_SHARE: f64 = 0.5;

/// What loading a model version took, or is expected to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub bytes: u64,
    /// Measured from the resident set; else estimated from the files.
    pub measured: bool,
    /// How long the measured load took.
    pub load: Duration,
    /// On CUDA: the GPU memory the load took (NVML); None on CPU or without the driver.
    pub device_bytes: Option<u64>,
}

/// In-flight requests and last use of one loaded model version.
#[derive(Debug)]
pub struct Usage {
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds since `EPOCH` of the last request (or of the load).
    last_use_ms: AtomicU64,
    loaded_ms: u64,
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_use_ms: AtomicU64::new(now_ms()),
            loaded_ms: now_ms(),
        }
    }
}

/// A request using a model version; ends when dropped.
pub struct InUse<'a>(&'a Usage);

impl Usage {
    pub fn begin(&self) -> InUse<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InUse(self)
    }

    pub fn touch(&self) {
        self.last_use_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests since the load.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Time since the load.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.loaded_ms))
    }

    /// Time since the last use.
    pub fn idle(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_use_ms.load(Ordering::Relaxed)))
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A loaded model as eviction sees it: all its ready versions together.
#[derive(Debug)]
pub struct Resident {
    pub name: String,
    pub bytes: u64,
    pub in_flight: usize,
    pub idle: Duration,
    /// Since its (newest version's) load.
    pub age: Duration,
}

/// Why no room could be made.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Larger than the capacity, or what could go is not enough.
    OverCapacity(String),
    /// Enough could go only by evicting models used within the churn guard.
    ChurnGuard(String),
}

type LoadFuture = Shared<BoxFuture<'static, Result<(), Error>>>;

pub struct Placement {
    pub capacity: u64,
    /// `--model-min-idle`: a model used more recently is not evicted for another.
    pub min_idle: Duration,
    /// `--load-model` names.
    pinned: Mutex<BTreeSet<String>>,
    /// Pinned by a load with `infermesh_pin` (a gateway's `copies.min`); unpinned the same way.
    pinned_asked: Mutex<BTreeSet<String>>,
    sizes: Mutex<HashMap<(String, i64), Size>>,
    /// The least any measured load but the process's first took beyond its files (a
    /// session's own arena and pre-packed weights; the first load also carries ONNX
    /// Runtime's one-time setup): added to a file size to estimate a load not yet
    /// measured. A load that then takes more is trimmed after (evictions).
    overhead: AtomicU64,
    measured_loads: AtomicUsize,
    /// Loads under way: a second ask for the same model waits for the first.
    loads: Mutex<HashMap<String, LoadFuture>>,
    pub gate: gate::Gate,
    pub metrics: PlacementMetrics,
    /// The NVIDIA driver's counters, where there is a driver.
    nvml: Option<device::Nvml>,
}

impl Placement {
    pub fn new(capacity: u64, min_idle: Duration, metrics: PlacementMetrics) -> Self {
        metrics.capacity_bytes.set(capacity as i64);
        Self {
            capacity,
            min_idle,
            pinned: Default::default(),
            pinned_asked: Default::default(),
            sizes: Default::default(),
            overhead: AtomicU64::new(u64::MAX),
            measured_loads: AtomicUsize::new(0),
            loads: Default::default(),
            gate: Default::default(),
            metrics,
            nvml: device::Nvml::open(),
        }
    }

    /// GPU memory in use now, summed over GPUs; None without the driver.
    pub fn device_used(&self) -> Option<u64> {
        self.nvml.as_ref()?.used()
    }

    pub fn pin(&self, name: &str) {
        self.pinned
            .lock()
            .expect("placement lock")
            .insert(name.to_string());
    }

    /// Pins (or unpins) `name` as a load's `infermesh_pin` asked; a `--load-model` pin
    /// stays whatever a load says.
    pub fn pin_asked(&self, name: &str, pin: bool) {
        let mut asked = self.pinned_asked.lock().expect("placement lock");
        match pin {
            true => asked.insert(name.to_string()),
            false => asked.remove(name),
        };
    }

    pub fn is_pinned(&self, name: &str) -> bool {
        self.pinned.lock().expect("placement lock").contains(name)
            || self
                .pinned_asked
                .lock()
                .expect("placement lock")
                .contains(name)
    }

    /// What `name` `version` took when last loaded, or its files' size plus the smallest
    /// overhead a measured load has shown.
    pub fn estimate(&self, name: &str, version: i64, dir: &std::path::Path) -> Size {
        let known = self
            .sizes
            .lock()
            .expect("placement lock")
            .get(&(name.to_string(), version))
            .copied();
        known.unwrap_or(Size {
            bytes: memory::files_size(dir)
                + match self.overhead.load(Ordering::Relaxed) {
                    u64::MAX => 0,
                    n => n,
                },
            measured: false,
            load: Duration::ZERO,
            device_bytes: None,
        })
    }

    /// What the loaded `models` took, summed.
    pub fn used(&self, models: &[std::sync::Arc<crate::model::Model>]) -> u64 {
        models
            .iter()
            .filter_map(|m| self.size(&m.name, m.version))
            .map(|s| s.bytes)
            .sum()
    }

    pub fn size(&self, name: &str, version: i64) -> Option<Size> {
        self.sizes
            .lock()
            .expect("placement lock")
            .get(&(name.to_string(), version))
            .copied()
    }

    /// `name` `version` took `bytes` (and `device_bytes` of GPU memory) and `load` to
    /// load, from `files` bytes of files.
    pub fn measured(
        &self,
        name: &str,
        version: i64,
        (bytes, device_bytes): (u64, Option<u64>),
        files: u64,
        load: Duration,
    ) {
        if self.measured_loads.fetch_add(1, Ordering::Relaxed) > 0 {
            self.overhead
                .fetch_min(bytes.saturating_sub(files), Ordering::Relaxed);
        }
        // A load keeps at least its weights: a smaller growth means memory freed by other
        // work during the load (requests, an eviction's last pages) offset it.
        let bytes = bytes.max(files);
        self.sizes.lock().expect("placement lock").insert(
            (name.to_string(), version),
            Size {
                bytes,
                measured: true,
                load,
                device_bytes,
            },
        );
        if let Some(d) = device_bytes {
            self.metrics.device_bytes(name, version).set(d as i64);
        }
    }

    /// The load under way for `name`, or `start()` made the one every later ask joins.
    /// Returns the future and whether this ask joined one already running.
    pub fn load_once(
        &self,
        name: &str,
        start: impl FnOnce() -> BoxFuture<'static, Result<(), Error>>,
    ) -> (LoadFuture, bool) {
        let mut loads = self.loads.lock().expect("placement lock");
        if let Some(f) = loads.get(name) {
            self.metrics.collapses.inc();
            return (f.clone(), true);
        }
        let f = futures::FutureExt::shared(start());
        loads.insert(name.to_string(), f.clone());
        (f, false)
    }

    pub fn load_done(&self, name: &str) {
        self.loads.lock().expect("placement lock").remove(name);
    }

    /// The models to evict so that `need` more bytes fit beside `resident` (least recently
    /// used first; never a pinned one, `except` or one with requests in flight).
    pub fn victims(
        &self,
        need: u64,
        except: &str,
        resident: &[Resident],
    ) -> Result<Vec<String>, NoRoom> {
        let used: u64 = resident
            .iter()
            .filter(|r| r.name != except)
            .map(|r| r.bytes)
            .sum();
        if need > self.capacity {
            return Err(NoRoom::OverCapacity(format!(
                "it needs about {need} bytes, more than this worker's whole capacity for models ({} bytes, --model-memory-bytes)",
                self.capacity
            )));
        }
        let mut free = self.capacity.saturating_sub(used);
        if need <= free {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<&Resident> = resident
            .iter()
            .filter(|r| r.name != except && r.in_flight == 0 && !self.is_pinned(&r.name))
            .collect();
        // Least recently used first.
        candidates.sort_by_key(|r| std::cmp::Reverse(r.idle));
        let mut out = Vec::new();
        let mut guarded = 0u64;
        for r in candidates {
            if need <= free {
                break;
            }
            if r.idle < self.min_idle {
                guarded += r.bytes;
                continue;
            }
            free += r.bytes;
            out.push(r.name.clone());
        }
        if need <= free {
            return Ok(out);
        }
        if need <= free + guarded {
            return Err(NoRoom::ChurnGuard(format!(
                "it needs about {need} bytes and {free} are free or could be freed; the rest is held by models used within the last {:?} (--model-min-idle), which are not evicted for another",
                self.min_idle
            )));
        }
        Err(NoRoom::OverCapacity(format!(
            "it needs about {need} bytes and at most {free} of this worker's {} (--model-memory-bytes) can be freed: the rest is pinned or has requests in flight",
            self.capacity
        )))
    }
}

#[cfg(test)]
mod tests;
