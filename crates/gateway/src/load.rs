//! The load estimate of one worker: PeakEWMA of round-trip time times outstanding requests
//! (as Linkerd and tower's `balance::p2c` use): a worker that just got slow is avoided at
//! once, and the estimate decays back over `DECAY`.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

// tokio's clock, so tests can run on paused time.
use tokio::time::Instant;

/// Time for an old latency sample to lose most of its weight.
const DECAY: Duration = Duration::from_secs(10);
/// Starting estimate before any request completes: below any real round trip, so a new
/// worker is tried as soon as it is a candidate (at 1 ms, a worker that joined next to
/// one answering in 0.3 ms was never tried at concurrency 1), yet a few requests in
/// flight on it cost as much as one on a measured worker.
const INITIAL: Duration = Duration::from_micros(100);

pub struct Load {
    outstanding: AtomicU64,
    /// (estimate in ns, when it was last updated)
    ewma: Mutex<(f64, Instant)>,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            outstanding: AtomicU64::new(0),
            ewma: Mutex::new((INITIAL.as_nanos() as f64, Instant::now())),
        }
    }
}

impl Load {
    /// Lower is better.
    pub fn cost(&self) -> f64 {
        let (ewma, _) = *self.ewma.lock().expect("load lock");
        ewma * (self.outstanding.load(Ordering::Relaxed) + 1) as f64
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Marks a request started; the guard records its round trip when dropped.
    pub fn start(&self) -> InFlight<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self,
            start: Instant::now(),
        }
    }

    fn observe(&self, rtt: Duration) {
        let mut g = self.ewma.lock().expect("load lock");
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        if rtt > g.0 {
            g.0 = rtt; // peak: react to a slowdown at once
        } else {
            let elapsed = now.saturating_duration_since(g.1).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            g.0 = g.0 * w + rtt * (1.0 - w);
        }
        g.1 = now;
    }
}

pub struct InFlight<'a> {
    load: &'a Load,
    start: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.load.observe(self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outstanding_requests_raise_the_cost() {
        let l = Load::default();
        let idle = l.cost();
        let g = l.start();
        assert!(l.cost() > idle);
        assert_eq!(l.outstanding(), 1);
        drop(g);
        assert_eq!(l.outstanding(), 0);
    }
}
