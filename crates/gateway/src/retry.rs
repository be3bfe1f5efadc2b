//! The budget that keeps retries (which failures are retried: `failure`) from
//! multiplying load when every worker is failing (as tower's and Linkerd's budgets do):
//! each request deposits `ratio` of a retry, each retry withdraws one, and a small floor
//! per second keeps a trickle of retries possible at low traffic.

use std::sync::Mutex;

use tokio::time::Instant;

/// Seconds of the floor kept in reserve (tower and Linkerd keep a 10 s window), so a
/// worker dying with many requests in flight can have them all retried.
const RESERVE_SECS: f64 = 10.0;

pub struct Budget {
    ratio: f64,
    floor_per_sec: f64,
    max: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    pub fn new(ratio: f64, floor_per_sec: f64) -> Self {
        let reserve = floor_per_sec * RESERVE_SECS;
        let max = reserve + 1000.0 * ratio;
        Self {
            ratio,
            floor_per_sec,
            max,
            state: Mutex::new((reserve, Instant::now())),
        }
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        let mut s = self.state.lock().expect("budget lock");
        s.0 = (s.0 + self.ratio).min(self.max);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().expect("budget lock");
        let now = Instant::now();
        let refill = now.saturating_duration_since(s.1).as_secs_f64() * self.floor_per_sec;
        s.0 = (s.0 + refill).min(self.max);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_by_the_ratio_plus_a_floor() {
        let b = Budget::new(0.2, 1.0);
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        // 1000 requests × 0.2 plus the reserve of 10 s × 1/s; no time passed.
        assert!((209..=210).contains(&retries), "{retries}");
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        let extra = (0..10).filter(|_| b.withdraw()).count();
        assert_eq!(extra, 5, "the floor refills one retry per second");
    }
}
