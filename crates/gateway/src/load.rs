//! The load estimate of one worker: PeakEWMA of round-trip time times outstanding requests
//! (as Linkerd and tower's `balance::p2c` use): a worker that just got slow is avoided at
//! once, and the estimate decays back over `DECAY` — also while nothing completes on it,
//! as Linkerd and Finagle decay on read, so a worker whose last request hung (a fault that
//! has since healed) or that sat idle is tried again instead of being shunned forever.

use std::{
    sync::atomic::{AtomicU64, Ordering},
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
    /// The estimate in ns (an f64's bits) and when it was last updated (ns after `base`):
    /// atomics, read on every pick without a lock. Two answers recording at once may
    /// pair one's estimate with the other's time, an error far below the estimate's own.
    ewma: AtomicU64,
    at: AtomicU64,
    base: Instant,
}

impl Default for Load {
    fn default() -> Self {
        let load = Self {
            outstanding: AtomicU64::new(0),
            ewma: AtomicU64::new(0),
            at: AtomicU64::new(0),
            base: Instant::now(),
        };
        load.reset();
        load
    }
}

impl Load {
    /// Lower is better.
    pub fn cost(&self) -> f64 {
        let (ewma, at) = self.estimate();
        decayed(ewma, at, Instant::now()) * (self.outstanding.load(Ordering::Relaxed) + 1) as f64
    }

    fn estimate(&self) -> (f64, Instant) {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let at = self.base + Duration::from_nanos(self.at.load(Ordering::Relaxed));
        (ewma, at)
    }

    fn set(&self, ewma: f64, at: Instant) {
        let since = at.saturating_duration_since(self.base).as_nanos();
        self.ewma.store(ewma.to_bits(), Ordering::Relaxed);
        self.at
            .store(since.min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Forgets the latency history: the worker is back from being out of rotation (an
    /// ejection, a fault), and what it did before says nothing about it now.
    pub fn reset(&self) {
        self.set(INITIAL.as_nanos() as f64, Instant::now());
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
            answered: false,
        }
    }

    /// `rtt`: a round trip that ended; `censored`: an attempt dropped before its answer
    /// (a hedge's loser, a cancelled caller), which only says the round trip would have
    /// taken longer than `rtt`. It counts as twice `rtt` (what is left of a wait that has
    /// lasted this long is, for a pause, about as long again) and may raise the estimate,
    /// never lower it: else a worker whose attempts are all cut short by hedges would look
    /// as fast as the cut, and draw more of them (measured: 2 % of requests hedged instead
    /// of 0.9 % with one stalling worker of three, bench/hedge.sh).
    fn observe(&self, rtt: Duration, censored: bool) {
        let (ewma, at) = self.estimate();
        let now = Instant::now();
        let before = decayed(ewma, at, now);
        let rtt = match censored {
            true => (2.0 * rtt.as_nanos() as f64).max(before),
            false => rtt.as_nanos() as f64,
        };
        let next = if rtt > before {
            rtt // peak: react to a slowdown at once
        } else {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            before * w + rtt * (1.0 - w)
        };
        self.set(next, now);
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
    answered: bool,
}

impl InFlight<'_> {
    /// The attempt ended with an answer or a failure (not dropped half-way).
    pub fn ended(&mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.load.observe(self.start.elapsed(), !self.answered);
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
        let mut h = healthy.start();
        tokio::time::advance(Duration::from_millis(2)).await;
        h.ended();
        drop(h);
        assert!(hung.cost() > 1000.0 * healthy.cost());
        // The healthy worker keeps answering in 2 ms; nothing completes on the other.
        for _ in 0..120 {
            tokio::time::advance(Duration::from_millis(998)).await;
            let mut h = healthy.start();
            tokio::time::advance(Duration::from_millis(2)).await;
            h.ended();
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

    /// An attempt dropped before its answer (a hedge's loser) never makes its worker look
    /// faster than it was measured, but a long one shows it is slower.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_cut_short_can_raise_the_estimate_never_lower_it() {
        let l = Load::default();
        let mut g = l.start();
        tokio::time::advance(Duration::from_millis(25)).await;
        g.ended();
        drop(g);
        let measured = l.cost();
        let g = l.start();
        tokio::time::advance(Duration::from_millis(5)).await;
        drop(g);
        assert!(l.cost() >= measured * 0.99, "{} vs {measured}", l.cost());
        let g = l.start();
        tokio::time::advance(Duration::from_millis(80)).await;
        drop(g);
        assert!(l.cost() >= 3.0 * measured, "{} vs {measured}", l.cost());
    }
}
