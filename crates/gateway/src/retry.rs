//! Which failures are retried on another worker, and the budget that keeps retries from
//! multiplying load when every worker is failing (as tower's and Linkerd's budgets do):
//! each request deposits `ratio` of a retry, each retry withdraws one, and a small floor
//! per second keeps a trickle of retries possible at low traffic.

use std::sync::Mutex;

use tokio::time::Instant;
use tonic::{Code, Status};

/// Failures that mean the request did not run, or ran nowhere that matters: inference is
/// idempotent, so these go to another worker while the deadline and budget allow.
pub fn retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted | Code::NotFound => true,
        // tonic's word for a connection that broke mid-call (the worker died): not an
        // answer from the worker's code, so another worker may run it.
        Code::Unknown => status.message().contains("transport error"),
        // The connection's dispatcher went away under the call ("operation was canceled"):
        // the gateway never cancels a call it is still waiting on, so this is the worker.
        Code::Cancelled => status.message().contains("operation was canceled"),
        _ => false,
    }
}

/// Seconds of the floor kept in reserve (tower and Linkerd keep a 10 s window), so a
/// worker dying with many requests in flight can have them all retried.
const RESERVE_SECS: f64 = 10.0;

/// A failure of the connection to the worker rather than an answer from it.
pub fn is_transport(status: &Status) -> bool {
    let msg = status.message();
    match status.code() {
        Code::Unknown => msg.contains("transport error"),
        Code::Cancelled => msg.contains("operation was canceled"),
        Code::Unavailable => {
            msg.contains("connect") || msg.contains("transport") || msg.contains("connection")
        }
        _ => false,
    }
}

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
