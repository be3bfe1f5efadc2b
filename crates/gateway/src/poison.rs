//! Poison containment: a request that breaks the connection of every worker it reaches (a
//! query of death) may break two workers once, never the fleet. A request is known by its
//! fingerprint: model, version, and a hash of its tensors' bytes as they came (every
//! `inputs` and `raw_input_contents` field: names, datatypes, shapes and contents). After its second worker breaks under it, the client gets UNAVAILABLE and the
//! same fingerprint is refused at the gateway, without reaching any worker, for the
//! quarantine time (`--poison-quarantine`).
//!
//! A worker that crashes also breaks the innocent requests it held at that moment; each
//! is retried once, and only one that is unlucky twice in a row is refused as well.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher, RandomState},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use infermesh_core::raw::RawRequest;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

/// Workers one request may break before it is refused.
pub const MAX_BREAKS: u32 = 2;

/// Fingerprints held at most; the oldest go first beyond it (a flood of distinct
/// poison requests cannot grow the gateway's memory).
const MAX_ENTRIES: usize = 10_000;

pub struct Quarantine {
    ttl: Duration,
    /// Keyed per process, so nobody can craft a request that collides with another's.
    keys: RandomState,
    until: Mutex<HashMap<u64, Instant>>,
    /// Entries, read without the lock: requests skip fingerprinting while it is 0.
    len: AtomicUsize,
    pub counted: Counter,
}

impl Quarantine {
    pub fn new(ttl: Duration, counted: Counter) -> Self {
        Self {
            ttl,
            keys: RandomState::new(),
            until: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            counted,
        }
    }

    pub fn fingerprint(&self, req: &RawRequest, version: &str) -> u64 {
        let mut h = self.keys.build_hasher();
        req.model_name.hash(&mut h);
        version.hash(&mut h);
        for field in req.tensor_fields() {
            field.hash(&mut h);
        }
        h.finish()
    }

    /// How long `fp` is still refused, if it is.
    pub fn refused(&self, fp: u64) -> Option<Duration> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut until = self.until.lock().expect("quarantine lock");
        let now = Instant::now();
        match until.get(&fp) {
            Some(&t) if t > now => Some(t - now),
            Some(_) => {
                until.remove(&fp);
                self.len.store(until.len(), Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// Whether any fingerprint is held (requests fingerprint themselves only then).
    pub fn is_active(&self) -> bool {
        self.len.load(Ordering::Relaxed) > 0
    }

    /// Refuses `fp` from now on for the quarantine time.
    pub fn add(&self, fp: u64) {
        let mut until = self.until.lock().expect("quarantine lock");
        let now = Instant::now();
        if until.len() >= MAX_ENTRIES {
            until.retain(|_, t| *t > now);
        }
        if until.len() >= MAX_ENTRIES {
            if let Some(oldest) = until.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                until.remove(&oldest);
            }
        }
        until.insert(fp, now + self.ttl);
        self.len.store(until.len(), Ordering::Relaxed);
        self.counted.inc();
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The reason a stream to a worker broke while requests were on it: the worker's
/// connection failed after they were sent. Travels as a `Status` source, not as text.
#[derive(Debug)]
pub struct WorkerBroke;

impl std::fmt::Display for WorkerBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the worker's connection broke while the request was on it")
    }
}

impl std::error::Error for WorkerBroke {}

/// Whether `status` says the worker's connection broke under a request already sent.
pub fn broke(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<WorkerBroke>() {
            return true;
        }
        source = e.source();
    }
    // A unary call whose connection broke mid-call (tonic says so only in words).
    matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
        && crate::failure::transport(status)
}

#[cfg(test)]
mod tests {
    use infermesh_proto as pb;
    use prost::Message as _;

    use super::*;

    fn req(byte: u8) -> RawRequest {
        let req = pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "UINT8".into(),
                shape: vec![1],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![byte].into()],
            id: format!("ids do not count {byte}"),
            ..Default::default()
        };
        RawRequest::decode(req.encode_to_vec().into()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_fingerprint_is_refused_until_its_time_is_up() {
        let q = Quarantine::new(Duration::from_secs(600), Counter::default());
        let (bad, good) = (q.fingerprint(&req(255), ""), q.fingerprint(&req(1), ""));
        assert_ne!(bad, good);
        assert_eq!(q.fingerprint(&req(255), ""), bad, "stable");
        assert_ne!(
            q.fingerprint(&req(255), "2"),
            bad,
            "the version is part of it"
        );
        assert!(!q.is_active());
        q.add(bad);
        assert_eq!(q.refused(bad), Some(Duration::from_secs(600)));
        assert_eq!(q.refused(good), None);
        tokio::time::advance(Duration::from_secs(601)).await;
        assert_eq!(q.refused(bad), None);
        assert!(!q.is_active(), "expired entries are dropped");
        assert_eq!(q.counted.get(), 1);
    }

    #[test]
    fn broke_reads_the_source_not_the_words() {
        let mut s = tonic::Status::unavailable("anything at all");
        assert!(!broke(&s));
        s.set_source(std::sync::Arc::new(WorkerBroke));
        assert!(broke(&s));
    }
}
