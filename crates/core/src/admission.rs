//! A bound on request bytes held in memory by one process (docs/limits.md): beyond it new
//! requests get RESOURCE_EXHAUSTED instead of the process growing toward an OOM kill.
//!
//! A budget may have a parent: a tenant's share is a child of the process budget, so a
//! byte taken from the share is taken from the process budget too, and one tenant can
//! exhaust only its own share.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use crate::Error;

pub mod body;

#[derive(Clone, Debug)]
pub struct ByteBudget(Arc<Level>);

/// One level of a budget chain.
#[derive(Debug)]
struct Level {
    /// 0 means unbounded. Atomic so that a tenant whose share changes on reload keeps the
    /// bytes it holds.
    limit: AtomicUsize,
    used: AtomicUsize,
    /// Woken when bytes come back while someone waits for them (a stream's next message).
    freed: Freed,
    /// What `--max-inflight-bytes` names in messages: the process or a tenant's share.
    what: &'static str,
    parent: Option<Arc<Level>>,
}

#[derive(Debug, Default)]
struct Freed {
    notify: tokio::sync::Notify,
    waiters: AtomicUsize,
}

impl Level {
    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::SeqCst);
        if self.freed.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify.notify_waiters();
        }
        if let Some(p) = &self.parent {
            p.release(n);
        }
    }

    fn force(&self, n: usize) {
        self.used.fetch_add(n, Ordering::SeqCst);
        if let Some(p) = &self.parent {
            p.force(n);
        }
    }

    /// Takes `n` from this level and every level above, all or none; on refusal, the level
    /// that refused with what it held before.
    fn take(&self, n: usize) -> Result<(), (&Level, usize)> {
        let prev = self.used.fetch_add(n, Ordering::SeqCst);
        let limit = self.limit.load(Ordering::Relaxed);
        if limit > 0 && prev.saturating_add(n) > limit {
            self.used.fetch_sub(n, Ordering::SeqCst);
            return Err((self, prev));
        }
        if let Some(p) = &self.parent {
            if let Err(refused) = p.take(n) {
                self.used.fetch_sub(n, Ordering::SeqCst);
                return Err(refused);
            }
        }
        Ok(())
    }

    /// Bytes that may still be taken here and above; `None` when nothing bounds them.
    fn left(&self) -> Option<usize> {
        let limit = self.limit.load(Ordering::Relaxed);
        let here = (limit > 0).then(|| limit.saturating_sub(self.used.load(Ordering::SeqCst)));
        match (here, self.parent.as_ref().and_then(|p| p.left())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The smallest limit on the chain (0: none).
    fn tightest(&self) -> usize {
        let limit = self.limit.load(Ordering::Relaxed);
        let above = self.parent.as_ref().map_or(0, |p| p.tightest());
        match (limit, above) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        }
    }
}

/// Bytes held by one request; returned to the budget (and every level above) on drop.
#[derive(Debug)]
pub struct BytesPermit {
    n: usize,
    level: Arc<Level>,
}

impl BytesPermit {
    /// Takes over `other`'s bytes: one permit for a message that arrives in frames. Both
    /// come from the same budget.
    pub fn absorb(&mut self, mut other: BytesPermit) {
        debug_assert!(Arc::ptr_eq(&self.level, &other.level));
        self.n += std::mem::take(&mut other.n);
    }

    /// Moves `n` of this permit's bytes (at most all) into a permit of their own.
    pub fn split_off(&mut self, n: usize) -> BytesPermit {
        let n = n.min(self.n);
        self.n -= n;
        BytesPermit {
            n,
            level: self.level.clone(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.n
    }
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        if self.n > 0 {
            self.level.release(self.n);
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
    let len = reply.encoded_len();
    held(reply, len, budget)
}

/// As [`held_reply`], for a reply of `len` bytes.
pub fn held<T>(reply: T, len: usize, budget: &ByteBudget) -> tonic::Response<T> {
    let permit = budget.force(len);
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
    /// The process budget; `limit` of 0 means unbounded.
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Level {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
            freed: Freed::default(),
            what: "the server's request budget (--max-inflight-bytes)",
            parent: None,
        }))
    }

    /// A share of this budget: at most `fraction` of its limit (see
    /// [`ByteBudget::set_fraction`]); what it holds counts here too.
    pub fn share(&self, fraction: f64, what: &'static str) -> Self {
        let share = Self(Arc::new(Level {
            limit: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
            freed: Freed::default(),
            what,
            parent: Some(self.0.clone()),
        }));
        share.set_fraction(fraction);
        share
    }

    /// Bounds this share at `fraction` of its parent's limit (none when the parent has
    /// none); bytes held stay counted.
    pub fn set_fraction(&self, fraction: f64) {
        let parent = self.0.parent.as_ref().map_or(0, |p| p.tightest());
        let limit = match parent {
            0 => 0,
            p => ((p as f64 * fraction) as usize).max(1),
        };
        self.0.limit.store(limit, Ordering::Relaxed);
    }

    pub fn acquire(&self, n: usize) -> Result<BytesPermit, Error> {
        if let Err((level, prev)) = self.0.take(n) {
            return Err(Error::ResourceExhausted(format!(
                "request of {n} bytes refused: {prev} bytes of requests are in flight and {} is {} bytes",
                level.what,
                level.limit.load(Ordering::Relaxed)
            ))
            .because(crate::Reason::OverBudget));
        }
        Ok(BytesPermit {
            n,
            level: self.0.clone(),
        })
    }

    /// Resolves the next time bytes come back to the budget. Create it before trying to
    /// acquire again, so a release in between is not missed.
    pub fn freed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        // Bytes freed anywhere on the chain may make room, and every release reaches the
        // top level: wait there.
        let top = top(&self.0);
        async move {
            top.freed.waiters.fetch_add(1, Ordering::SeqCst);
            struct Waiting(Arc<Level>);
            impl Drop for Waiting {
                fn drop(&mut self) {
                    self.0.freed.waiters.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _waiting = Waiting(top.clone());
            top.freed.notify.notified().await;
        }
    }

    /// Counts `n` bytes whatever the limit: a reply already computed must still go out,
    /// but while it waits for its client to read it, new requests see the budget taken.
    pub fn force(&self, n: usize) -> BytesPermit {
        self.0.force(n);
        BytesPermit {
            n,
            level: self.0.clone(),
        }
    }

    /// Bytes that may still be taken here (and above); `None` when unbounded.
    pub fn left(&self) -> Option<usize> {
        self.0.left()
    }

    /// The tightest bound on the chain (0: unbounded).
    pub fn limit(&self) -> usize {
        self.0.tightest()
    }

    /// What this level is, for messages ("the server's request budget (...)").
    pub fn what(&self) -> &'static str {
        self.0.what
    }

    pub fn in_flight(&self) -> usize {
        self.0.used.load(Ordering::SeqCst)
    }
}

fn top(level: &Arc<Level>) -> Arc<Level> {
    match &level.parent {
        Some(p) => top(p),
        None => level.clone(),
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
