//! A bound on request bytes held in memory by one process (docs/limits.md): beyond it new
//! requests get RESOURCE_EXHAUSTED instead of the process growing toward an OOM kill.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use crate::Error;

pub mod body;

#[derive(Clone, Debug)]
pub struct ByteBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
    /// Woken when bytes come back while someone waits for them (a stream's next message).
    freed: Arc<Freed>,
}

#[derive(Debug, Default)]
struct Freed {
    notify: tokio::sync::Notify,
    waiters: AtomicUsize,
}

/// Bytes held by one request; returned to the budget on drop.
#[derive(Debug)]
pub struct BytesPermit {
    n: usize,
    used: Arc<AtomicUsize>,
    freed: Arc<Freed>,
}

impl BytesPermit {
    /// Takes over `other`'s bytes: one permit for a message that arrives in frames.
    pub fn absorb(&mut self, mut other: BytesPermit) {
        self.n += std::mem::take(&mut other.n);
    }

    /// Moves `n` of this permit's bytes (at most all) into a permit of their own.
    pub fn split_off(&mut self, n: usize) -> BytesPermit {
        let n = n.min(self.n);
        self.n -= n;
        BytesPermit {
            n,
            used: self.used.clone(),
            freed: self.freed.clone(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.n
    }
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        self.used.fetch_sub(self.n, Ordering::SeqCst);
        if self.freed.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify.notify_waiters();
        }
    }
}

/// A unary reply's bytes, carried in the response's extensions to the layer that holds
/// them until the body is written (or dropped). Clone because extensions must be.
#[derive(Clone, Debug)]
pub struct HeldReply(Arc<std::sync::Mutex<Option<BytesPermit>>>);

/// A unary reply whose bytes count against `budget` until the counting layer has written
/// it (see `body::CountedLayer`).
pub fn held_reply<T: prost::Message>(reply: T, budget: &ByteBudget) -> tonic::Response<T> {
    let permit = budget.force(reply.encoded_len());
    let mut reply = tonic::Response::new(reply);
    reply.extensions_mut().insert(HeldReply::new(permit));
    reply
}

impl HeldReply {
    pub fn new(permit: BytesPermit) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(permit))))
    }

    pub fn take(&self) -> Option<BytesPermit> {
        self.0.lock().ok()?.take()
    }
}

impl ByteBudget {
    /// `limit` of 0 means unbounded.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
            freed: Default::default(),
        }
    }

    pub fn acquire(&self, n: usize) -> Result<BytesPermit, Error> {
        let prev = self.used.fetch_add(n, Ordering::SeqCst);
        if self.limit > 0 && prev + n > self.limit {
            self.used.fetch_sub(n, Ordering::SeqCst);
            return Err(Error::ResourceExhausted(format!(
                "request of {n} bytes refused: {prev} bytes of requests are in flight and the limit is {} (--max-inflight-bytes)",
                self.limit
            ))
            .because(crate::Reason::OverBudget));
        }
        Ok(BytesPermit {
            n,
            used: self.used.clone(),
            freed: self.freed.clone(),
        })
    }

    /// Resolves the next time bytes come back to the budget. Create it before trying to
    /// acquire again, so a release in between is not missed.
    pub fn freed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let freed = self.freed.clone();
        async move {
            freed.waiters.fetch_add(1, Ordering::SeqCst);
            struct Waiting(Arc<Freed>);
            impl Drop for Waiting {
                fn drop(&mut self) {
                    self.0.waiters.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _waiting = Waiting(freed.clone());
            freed.notify.notified().await;
        }
    }

    /// Counts `n` bytes whatever the limit: a reply already computed must still go out,
    /// but while it waits for its client to read it, new requests see the budget taken.
    pub fn force(&self, n: usize) -> BytesPermit {
        self.used.fetch_add(n, Ordering::SeqCst);
        BytesPermit {
            n,
            used: self.used.clone(),
            freed: self.freed.clone(),
        }
    }

    /// Bytes that may still be taken; `None` when unbounded.
    pub fn left(&self) -> Option<usize> {
        (self.limit > 0).then(|| self.limit.saturating_sub(self.in_flight()))
    }

    pub fn limit(&self) -> usize {
        self.limit
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
