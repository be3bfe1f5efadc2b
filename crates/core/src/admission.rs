//! A bound on request bytes held in memory by one process (DESIGN.md §7): beyond it new
//! requests get RESOURCE_EXHAUSTED instead of the process growing toward an OOM kill.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use crate::Error;

#[derive(Clone, Debug)]
pub struct ByteBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
}

/// Bytes held by one request; returned to the budget on drop.
#[derive(Debug)]
pub struct BytesPermit {
    n: usize,
    used: Arc<AtomicUsize>,
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        self.used.fetch_sub(self.n, Ordering::SeqCst);
    }
}

impl ByteBudget {
    /// `limit` of 0 means unbounded.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn acquire(&self, n: usize) -> Result<BytesPermit, Error> {
        let prev = self.used.fetch_add(n, Ordering::SeqCst);
        if self.limit > 0 && prev + n > self.limit {
            self.used.fetch_sub(n, Ordering::SeqCst);
            return Err(Error::ResourceExhausted(format!(
                "request of {n} bytes refused: {prev} bytes of requests are in flight and the limit is {} (--max-inflight-bytes)",
                self.limit
            )));
        }
        Ok(BytesPermit {
            n,
            used: self.used.clone(),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_return_their_bytes() {
        let b = ByteBudget::new(100);
        let p = b.acquire(60).unwrap();
        assert!(b.acquire(50).is_err());
        assert_eq!(b.in_flight(), 60);
        drop(p);
        assert!(b.acquire(100).is_ok());
        assert!(ByteBudget::new(0).acquire(usize::MAX / 2).is_ok());
    }
}
