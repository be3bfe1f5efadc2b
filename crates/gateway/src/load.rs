//! The load estimate of one worker: PeakEWMA of round-trip time times outstanding requests
//! (as Linkerd and tower's `balance::p2c` use): a worker that just got slow is avoided at
//! once, and the estimate decays back over `DECAY` — also while nothing completes on it,
//! as Linkerd and Finagle decay on read, so a worker whose last request hung (a fault that
//! has since healed) or that sat idle is tried again instead of being shunned forever.

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
        let (ewma, at) = *self.ewma.lock().expect("load lock");
        decayed(ewma, at, Instant::now()) * (self.outstanding.load(Ordering::Relaxed) + 1) as f64
    }

    /// Forgets the latency history: the worker is back from being out of rotation (an
    /// ejection, a fault), and what it did before says nothing about it now.
    pub fn reset(&self) {
        *self.ewma.lock().expect("load lock") = (INITIAL.as_nanos() as f64, Instant::now());
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
        let before = decayed(g.0, g.1, now);
        if rtt > before {
            g.0 = rtt; // peak: react to a slowdown at once
        } else {
            let elapsed = now.saturating_duration_since(g.1).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            g.0 = before * w + rtt * (1.0 - w);
        }
        g.1 = now;
    }
}

/// The estimate `ewma` (set at `at`) as time has worn it down by `now`.
fn decayed(ewma: f64, at: Instant, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(at).as_secs_f64();
    ewma * (-elapsed / DECAY.as_secs_f64()).exp()
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

    /// A request that hung for 10 s must not keep its worker shunned once the fault is
    /// over: the estimate wears off with time even when nothing completes there.
    #[tokio::test(start_paused = true)]
    async fn a_hung_request_wears_off_with_time() {
        let (hung, healthy) = (Load::default(), Load::default());
        let g = hung.start();
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(g);
        let h = healthy.start();
        tokio::time::advance(Duration::from_millis(2)).await;
        drop(h);
        assert!(hung.cost() > 1000.0 * healthy.cost());
        // The healthy worker keeps answering in 2 ms; nothing completes on the other.
        for _ in 0..120 {
            tokio::time::advance(Duration::from_millis(998)).await;
            let h = healthy.start();
            tokio::time::advance(Duration::from_millis(2)).await;
            drop(h);
        }
        assert!(
            hung.cost() < healthy.cost(),
            "{} vs {}",
            hung.cost(),
            healthy.cost()
        );
        hung.reset();
        assert_eq!(hung.cost(), INITIAL.as_nanos() as f64);
    }
}
