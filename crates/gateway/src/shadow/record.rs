//! What shadow copies came to, per (model, target): the metric series (made when the
//! rule is read, so dashboards show them at 0) and the numbers `infermesh routes` shows.
//! Kept across reloads of the routing file.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Instant,
};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use super::compare::{Comparison, Outcome};

/// One (model, target)'s shadow results.
#[derive(Debug)]
pub struct Stats {
    pub model: String,
    /// agree, disagree, error, dropped (the `result` label's values, in this order).
    pub results: [Counter; 4],
    pub max_abs: Histogram,
    pub cosine: Histogram,
    /// The largest max absolute error of any comparison (f64 bits; errors are never
    /// negative, so their bits order as they do).
    worst: AtomicU64,
    /// Rows of classification-shaped outputs whose argmax changed, and rows compared.
    argmax: [AtomicU64; 2],
    /// The last error's reason, for `infermesh routes`.
    last_error: Mutex<String>,
    /// Rate limit of the log: the second (since `start`) of the last line, plus one.
    logged: AtomicU64,
    start: Instant,
}

/// The `result` label's values.
pub const RESULTS: [&str; 4] = ["agree", "disagree", "error", "dropped"];

/// What `infermesh routes` shows.
pub struct Totals {
    pub agree: u64,
    pub disagree: u64,
    pub error: u64,
    pub dropped: u64,
    pub worst: f64,
    pub argmax_changed: u64,
    pub argmax_rows: u64,
    pub last_error: String,
}

impl Stats {
    pub fn new(model: &str, results: [Counter; 4], max_abs: Histogram, cosine: Histogram) -> Self {
        Self {
            model: model.to_string(),
            results,
            max_abs,
            cosine,
            worst: AtomicU64::new(0f64.to_bits()),
            argmax: Default::default(),
            last_error: Mutex::new(String::new()),
            logged: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            agree: self.results[0].get(),
            disagree: self.results[1].get(),
            error: self.results[2].get(),
            dropped: self.results[3].get(),
            worst: f64::from_bits(self.worst.load(Relaxed)),
            argmax_changed: self.argmax[0].load(Relaxed),
            argmax_rows: self.argmax[1].load(Relaxed),
            last_error: self.last_error.lock().expect("shadow lock").clone(),
        }
    }

    /// At most one log line a second per (model, target).
    fn may_log(&self) -> bool {
        let now = self.start.elapsed().as_secs() + 1;
        let last = self.logged.load(Relaxed);
        last != now
            && self
                .logged
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }

    pub fn dropped(&self, target: &str, why: &str) {
        self.results[3].inc();
        tracing::debug!(model = %self.model, target, "shadow copy dropped: {why}");
    }

    pub fn failed(&self, target: &str, id: &str, why: &str) {
        self.results[2].inc();
        *self.last_error.lock().expect("shadow lock") = why.to_string();
        if self.may_log() {
            tracing::warn!(model = %self.model, target, request_id = %id, "shadow copy could not be compared: {why}");
        }
    }

    /// Counts a comparison; `Some(agreed)` unless it was an error.
    pub fn compared(&self, target: &str, id: &str, c: &Comparison) -> Option<bool> {
        let agreed = match &c.outcome {
            Outcome::Error(why) => {
                self.failed(target, id, why);
                return None;
            }
            Outcome::Agree => true,
            Outcome::Disagree => false,
        };
        self.results[usize::from(!agreed)].inc();
        if let Some(cosine) = c.cosine {
            self.max_abs.observe(c.max_abs);
            self.cosine.observe(cosine);
        }
        self.worst.fetch_max(c.max_abs.to_bits(), Relaxed);
        self.argmax[0].fetch_add(c.argmax.0, Relaxed);
        self.argmax[1].fetch_add(c.argmax.1, Relaxed);
        if !agreed && self.may_log() {
            tracing::warn!(
                model = %self.model,
                target,
                request_id = %id,
                output = c.worst.as_deref().unwrap_or(""),
                max_abs_error = c.max_abs,
                max_rel_error = c.max_rel,
                "shadow answer disagrees with the primary's"
            );
        }
        Some(agreed)
    }
}
