//! A tenant's quotas: a token bucket (requests per second with a burst) and a cap on
//! requests in flight. Over either, a request is refused at once (RESOURCE_EXHAUSTED),
//! never queued.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc, Mutex,
};

use tokio::time::Instant;

use super::file::Limits;

#[derive(Debug)]
pub struct Quota {
    rate: Option<Bucket>,
    /// Every call that is not inference (metadata, index, statistics, readiness, control):
    /// a bucket of its own, so they can neither bypass quotas nor spend inference's.
    small: Option<Bucket>,
    max_concurrent: Option<u32>,
    in_flight: Arc<AtomicU32>,
}

/// A token bucket: `per_second` refilled continuously up to `burst`.
#[derive(Debug)]
struct Bucket {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn take(&self) -> bool {
        let mut b = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * self.per_second;
        b.0 = (b.0 + refill).min(self.burst);
        b.1 = now;
        if b.0 < 1.0 {
            return false;
        }
        b.0 -= 1.0;
        true
    }
}

/// Held while a request runs; counts against `max_concurrent`.
#[derive(Debug)]
pub struct Permit(Option<Arc<AtomicU32>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(n) = &self.0 {
            n.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Which quota refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    Rate,
    Concurrency,
}

impl Quota {
    pub fn new(l: &Limits) -> Self {
        let rate = l
            .requests_per_second
            .map(|r| Bucket::new(r, l.burst.map_or(r.max(1.0), f64::from)));
        let small = l.small_calls().map(|r| Bucket::new(r, r.max(1.0)));
        Self {
            rate,
            small,
            max_concurrent: l.max_concurrent,
            in_flight: Arc::new(AtomicU32::new(0)),
        }
    }

    /// One call that is not inference: a token from the small calls' bucket.
    pub fn admit_small(&self) -> bool {
        self.small.as_ref().is_none_or(Bucket::take)
    }

    /// One request: a token and a slot, or which limit it is over.
    pub fn admit(&self) -> Result<Permit, Over> {
        let permit = match self.max_concurrent {
            None => Permit(None),
            Some(max) => {
                let was = self.in_flight.fetch_add(1, Ordering::SeqCst);
                let p = Permit(Some(self.in_flight.clone()));
                if was >= max {
                    return Err(Over::Concurrency); // p drops: the slot is given back
                }
                p
            }
        };
        if self.rate.as_ref().is_some_and(|b| !b.take()) {
            return Err(Over::Rate);
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_the_burst_then_the_rate() {
        let q = Quota::new(&Limits {
            requests_per_second: Some(10.0),
            burst: Some(5),
            max_concurrent: None,
            max_inflight_share: None,
            small_calls_per_second: None,
        });
        let ok = (0..8).filter(|_| q.admit().is_ok()).count();
        assert_eq!(ok, 5);
        tokio::time::advance(std::time::Duration::from_millis(300)).await;
        let ok = (0..8).filter(|_| q.admit().is_ok()).count();
        assert_eq!(ok, 3);
    }

    #[test]
    fn the_concurrency_cap_counts_permits_held() {
        let q = Quota::new(&Limits {
            requests_per_second: None,
            burst: None,
            max_concurrent: Some(2),
            max_inflight_share: None,
            small_calls_per_second: None,
        });
        let a = q.admit().unwrap();
        let _b = q.admit().unwrap();
        assert_eq!(q.admit().unwrap_err(), Over::Concurrency);
        drop(a);
        assert!(q.admit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn small_calls_have_a_bucket_of_their_own() {
        // Default: ten times the inference rate.
        let q = Quota::new(&Limits {
            requests_per_second: Some(2.0),
            burst: Some(2),
            max_concurrent: None,
            max_inflight_share: None,
            small_calls_per_second: None,
        });
        assert_eq!((0..50).filter(|_| q.admit_small()).count(), 20);
        assert_eq!(
            (0..5).filter(|_| q.admit().is_ok()).count(),
            2,
            "inference is untouched"
        );
    }
}
