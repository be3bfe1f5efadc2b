//! Each model version's recent answer times through the gateway, for the per-attempt
//! timeout (a new version may be slower or faster than the one it replaces):
//! the last `WINDOW` successful attempts, their 99th percentile recomputed every
//! `EVERY` answers and read without a lock.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

const WINDOW: usize = 128;
const EVERY: usize = 16;
/// Answers needed before the percentile is trusted (until then attempts get the whole
/// deadline: a slow model's first requests must not be cut short).
const MIN_SAMPLES: usize = 32;

#[derive(Default)]
struct Model {
    /// (ring of µs, next slot, total seen)
    recent: Mutex<(Vec<u32>, usize, usize)>,
    /// µs; 0 until MIN_SAMPLES answers.
    p99_us: AtomicU64,
}

#[derive(Default)]
pub struct Latencies {
    /// By model, then version.
    models: RwLock<HashMap<String, HashMap<i64, Arc<Model>>>>,
}

impl Latencies {
    /// The model version's recent 99th percentile, once enough answers have been seen.
    pub fn p99(&self, model: &str, version: i64) -> Option<Duration> {
        let models = self.models.read().expect("latency lock");
        let us = models
            .get(model)?
            .get(&version)?
            .p99_us
            .load(Ordering::Relaxed);
        (us > 0).then(|| Duration::from_micros(us))
    }

    /// One successful attempt for a model version some worker serves (so names and
    /// versions are bounded).
    pub fn observe(&self, model: &str, version: i64, took: Duration) {
        let entry = self
            .models
            .read()
            .expect("latency lock")
            .get(model)
            .and_then(|v| v.get(&version))
            .cloned();
        let entry = match entry {
            Some(e) => e,
            None => self
                .models
                .write()
                .expect("latency lock")
                .entry(model.to_string())
                .or_default()
                .entry(version)
                .or_default()
                .clone(),
        };
        let us = took.as_micros().min(u32::MAX as u128) as u32;
        let mut r = entry.recent.lock().expect("latency lock");
        let (ring, next, seen) = &mut *r;
        if ring.len() < WINDOW {
            ring.push(us);
        } else {
            ring[*next] = us;
        }
        *next = (*next + 1) % WINDOW;
        *seen += 1;
        if *seen >= MIN_SAMPLES && *seen % EVERY == 0 {
            let mut sorted = ring.clone();
            sorted.sort_unstable();
            let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
            entry.p99_us.store(u64::from(p99.max(1)), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_needs_enough_answers_and_follows_the_recent_ones() {
        let l = Latencies::default();
        for _ in 0..MIN_SAMPLES - 1 {
            l.observe("m", 1, Duration::from_millis(2));
        }
        assert_eq!(l.p99("m", 1), None, "too few answers to trust");
        l.observe("m", 1, Duration::from_millis(2));
        assert_eq!(l.p99("m", 1), Some(Duration::from_millis(2)));
        for _ in 0..WINDOW {
            l.observe("m", 1, Duration::from_millis(40));
        }
        assert_eq!(l.p99("m", 1), Some(Duration::from_millis(40)));
        assert_eq!(l.p99("m", 2), None, "each version keeps its own");
        assert_eq!(l.p99("other", 1), None);
    }
}
