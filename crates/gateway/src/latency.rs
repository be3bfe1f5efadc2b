//! Each model version's recent answer times through the gateway, in a decaying
//! histogram: for the per-attempt timeout (its p99; a new version may be slower or faster
//! than the one it replaces) and for hedging (`after: p95`).
//!
//! Log-scale buckets (16 per power of two, so a reading is within 1/16 of the truth)
//! counted with atomics; every `DECAY_EVERY` answers every bucket is halved, so the
//! histogram follows the last few hundred answers. The percentiles are recomputed every
//! `EVERY` answers and read without a lock.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc, RwLock,
    },
    time::Duration,
};

use crate::routes::file::PERCENTILES;

const EVERY: u64 = 16;
const DECAY_EVERY: u64 = 256;
/// Answers needed before the p99 bounds an attempt (until then attempts get the whole
/// deadline: a slow model's first requests must not be cut short).
const MIN_SAMPLES: u64 = 32;
/// Answers needed before a percentile sends hedges.
pub const MIN_HEDGE_SAMPLES: u64 = 100;

const SUB: u32 = 16;
/// µs from 0 to 2^32 (over an hour): 16 exact buckets below 16 µs, then 16 per octave.
const BUCKETS: usize = (SUB + (32 - 4) * SUB) as usize;

fn bucket(us: u32) -> usize {
    if us < SUB {
        return us as usize;
    }
    let octave = 31 - us.leading_zeros(); // >= 4
    let sub = (us >> (octave - 4)) & (SUB - 1);
    (SUB + (octave - 4) * SUB + sub) as usize
}

/// The largest µs value of bucket `i` (an attempt bound errs long, never short).
fn upper(i: usize) -> u64 {
    let i = i as u64;
    let sub = u64::from(SUB);
    if i < sub {
        return i;
    }
    let octave = (i - sub) / sub + 4;
    let low = (sub + (i - sub) % sub) << (octave - 4);
    low + (1 << (octave - 4)) - 1
}

struct Model {
    counts: Vec<AtomicU32>,
    seen: AtomicU64,
    /// µs for each of `PERCENTILES`, 0 until computed.
    quantiles: [AtomicU64; PERCENTILES.len()],
}

impl Default for Model {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            seen: AtomicU64::new(0),
            quantiles: Default::default(),
        }
    }
}

impl Model {
    fn observe(&self, took: Duration) {
        let us = took.as_micros().min(u32::MAX as u128) as u32;
        self.counts[bucket(us)].fetch_add(1, Relaxed);
        let seen = self.seen.fetch_add(1, Relaxed) + 1;
        if seen.is_multiple_of(DECAY_EVERY) {
            for c in &self.counts {
                // Two halvings racing lose at most one count: the histogram's own error.
                let _ = c.fetch_update(Relaxed, Relaxed, |n| Some(n / 2));
            }
        }
        if seen.is_multiple_of(EVERY) || seen == MIN_SAMPLES {
            self.recompute();
        }
    }

    fn recompute(&self) {
        let counts: Vec<u32> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().map(|c| u64::from(*c)).sum();
        if total == 0 {
            return;
        }
        for (slot, p) in self.quantiles.iter().zip(PERCENTILES) {
            // The first bucket where the running count reaches p % of the total.
            let want = (total * u64::from(p)).div_ceil(100).max(1);
            let mut run = 0u64;
            let i = counts
                .iter()
                .position(|c| {
                    run += u64::from(*c);
                    run >= want
                })
                .unwrap_or(BUCKETS - 1);
            slot.store(upper(i).max(1), Relaxed);
        }
    }

    fn quantile(&self, p: u8, min_samples: u64) -> Option<Duration> {
        if self.seen.load(Relaxed) < min_samples {
            return None;
        }
        let i = PERCENTILES.iter().position(|q| *q == p)?;
        let us = self.quantiles[i].load(Relaxed);
        (us > 0).then(|| Duration::from_micros(us))
    }
}

#[derive(Default)]
pub struct Latencies {
    /// By model, then version.
    models: RwLock<HashMap<String, HashMap<i64, Arc<Model>>>>,
}

impl Latencies {
    fn get(&self, model: &str, version: i64) -> Option<Arc<Model>> {
        let models = self.models.read().expect("latency lock");
        models.get(model)?.get(&version).cloned()
    }

    /// The model version's recent 99th percentile, once enough answers have been seen.
    pub fn p99(&self, model: &str, version: i64) -> Option<Duration> {
        self.get(model, version)?.quantile(99, MIN_SAMPLES)
    }

    /// A percentile of `PERCENTILES`, once `min_samples` answers have been seen.
    pub fn quantile(&self, model: &str, version: i64, p: u8, min_samples: u64) -> Option<Duration> {
        self.get(model, version)?.quantile(p, min_samples)
    }

    /// Answers seen for the model version.
    pub fn samples(&self, model: &str, version: i64) -> u64 {
        self.get(model, version).map_or(0, |m| m.seen.load(Relaxed))
    }

    /// One answer (or a hedged attempt's loser, cancelled after this long) for a model
    /// version some worker serves (so names and versions are bounded).
    pub fn observe(&self, model: &str, version: i64, took: Duration) {
        let entry = match self.get(model, version) {
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
        entry.observe(took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_within_a_sixteenth() {
        let mut last = 0;
        for us in [0u32, 1, 15, 16, 17, 31, 32, 100, 1000, 123_456, u32::MAX] {
            let b = bucket(us);
            assert!(b >= last && b < BUCKETS, "{us}");
            assert!(upper(b) >= u64::from(us), "{us}: {}", upper(b));
            assert!(
                upper(b) <= u64::from(us) + u64::from(us) / 16 + 1,
                "{us}: {}",
                upper(b)
            );
            last = b;
        }
    }

    #[test]
    fn the_percentiles_need_enough_answers_and_follow_the_recent_ones() {
        let l = Latencies::default();
        for _ in 0..MIN_SAMPLES - 1 {
            l.observe("m", 1, Duration::from_millis(2));
        }
        assert_eq!(l.p99("m", 1), None, "too few answers to trust");
        l.observe("m", 1, Duration::from_millis(2));
        let p99 = l.p99("m", 1).unwrap();
        assert!((2000..=2130).contains(&p99.as_micros()), "{p99:?}");
        assert_eq!(
            l.quantile("m", 1, 95, MIN_HEDGE_SAMPLES),
            None,
            "hedging waits for 100"
        );
        // 90 fast and 10 slow of every 100: p50 fast, p95 and p99 slow.
        for i in 0..2000 {
            let ms = if i % 10 == 0 { 40 } else { 1 };
            l.observe("m", 1, Duration::from_millis(ms));
        }
        let q = |p| {
            l.quantile("m", 1, p, MIN_HEDGE_SAMPLES)
                .unwrap()
                .as_millis()
        };
        assert_eq!((q(50), q(95), q(99)), (1, 40, 40));
        // All fast now: the slow answers decay out within a few hundred.
        for _ in 0..1000 {
            l.observe("m", 1, Duration::from_millis(1));
        }
        assert_eq!(q(99), 1);
        assert_eq!(l.p99("m", 2), None, "each version keeps its own");
        assert_eq!(l.samples("other", 1), 0);
    }
}
