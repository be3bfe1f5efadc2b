//! The routing file's `shadow`: after a request's answer is on its way to the client, a
//! copy of the request goes to the shadow target (another version, or another model) and
//! the two answers are compared tensor by tensor (`compare`).
//!
//! Bounded and never in the client's way: at most [`MAX_IN_FLIGHT`] copies per model are
//! in flight, and a copy is dropped (counted) rather than queued when that is full, when
//! the shadow bytes would take more than [`BYTES_SHARE`] of the gateway's byte budget,
//! or when the target's workers are busy (the worker refuses it) or not ready. A copy is
//! one attempt (never retried, never hedged) bounded by [`TIMEOUT`], and every copy still
//! in flight is cancelled when the gateway shuts down.

pub mod compare;
pub mod record;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use infermesh_core::{
    admission::ByteBudget,
    raw::{put_string, RawAnswer, RawRequest},
    trace, Error,
};
use infermesh_proto::ModelInferResponse;
use tokio::sync::{watch, Semaphore};
use tonic::Status;

use crate::{balance, endpoint::upstream, guard, pool::Pool, route, routes::rules};
pub use record::Stats;

/// Shadow copies one model may have in flight.
pub const MAX_IN_FLIGHT: usize = 32;
/// The part of the gateway's byte budget shadow copies may hold.
pub const BYTES_SHARE: f64 = 0.25;
/// How long a shadow copy may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Triton's sequence parameters: a request of a sequence is never copied (its state lives
/// on the worker that has the sequence).
const SEQUENCE: [&str; 3] = ["sequence_id", "sequence_start", "sequence_end"];

/// One model's shadow rule in force, kept while its entry in the file is unchanged.
#[derive(Debug)]
pub struct Rule {
    pub rule: rules::Shadow,
    /// The target as metrics name it (`model:version`, or the model alone).
    pub label: String,
    seen: AtomicU64,
    in_flight: Arc<Semaphore>,
    pub stats: Arc<Stats>,
}

impl Rule {
    pub fn new(rule: rules::Shadow, label: String, stats: Arc<Stats>) -> Self {
        Self {
            rule,
            label,
            seen: AtomicU64::new(0),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stats,
        }
    }

    /// Whether this answered request is copied: exactly `percent` of them, spread evenly.
    fn sampled(&self) -> bool {
        let per = u64::from(self.rule.per_10k);
        let n = self.seen.fetch_add(1, Relaxed);
        (n + 1) * per / 10_000 > n * per / 10_000
    }

    /// Shadow copies in flight now.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.in_flight.available_permits()
    }
}

/// The gateway's shadow copies: where they go, their share of the byte budget, and the
/// signal that cancels them at shutdown.
pub struct Shadows {
    pool: Arc<Pool>,
    bytes: ByteBudget,
    stop: watch::Sender<bool>,
}

impl Shadows {
    pub fn new(pool: Arc<Pool>, bytes: &ByteBudget) -> Self {
        Self {
            pool,
            bytes: bytes.share(
                BYTES_SHARE,
                "the shadow copies' share of the gateway's request budget (--max-inflight-bytes)",
            ),
            stop: watch::channel(false).0,
        }
    }

    /// Cancels every shadow copy in flight, and any offered from now on.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Copies `req` (answered with `primary`) to `policy`'s shadow target, when it has one
    /// and this request is sampled; returns at once.
    pub fn offer(&self, policy: &Arc<route::Policy>, req: &Arc<RawRequest>, primary: &RawAnswer) {
        let Some(rule) = &policy.shadow else {
            return;
        };
        if SEQUENCE.iter().any(|p| req.parameters.contains_key(*p)) || !rule.sampled() {
            return;
        }
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return;
        }
        let Ok(slot) = rule.in_flight.clone().try_acquire_owned() else {
            return rule.stats.dropped(
                &rule.label,
                "the model's shadow copies in flight are at their limit",
            );
        };
        let Ok(bytes) = self.bytes.acquire(req.bytes.len()) else {
            return rule.stats.dropped(
                &rule.label,
                "the shadow copies' share of the byte budget is taken",
            );
        };
        let copy = Copy {
            pool: self.pool.clone(),
            policy: policy.clone(),
            req: req.clone(),
            primary: primary.bytes.clone(),
        };
        tokio::spawn(async move {
            let _held = (slot, bytes);
            tokio::select! {
                _ = stop.changed() => {}
                _ = copy.run() => {}
            }
        });
    }
}

/// One shadow copy.
struct Copy {
    pool: Arc<Pool>,
    policy: Arc<route::Policy>,
    req: Arc<RawRequest>,
    primary: Bytes,
}

/// How a shadow attempt ended, before comparing.
enum Sent {
    Answer(Bytes, i64),
    Dropped(String),
    Failed(String),
}

impl Copy {
    async fn run(self) {
        let rule = self.policy.shadow.as_ref().expect("a shadow rule");
        let model = rule.rule.model.as_deref().unwrap_or(&self.req.model_name);
        let same_model = model == self.req.model_name;
        let (answer, version) = match self.send(model, same_model).await {
            Sent::Answer(bytes, version) => (bytes, version),
            Sent::Dropped(why) => return rule.stats.dropped(&rule.label, &why),
            Sent::Failed(why) => return rule.stats.failed(&rule.label, &self.req.id, &why),
        };
        let decode = |b: &Bytes, whose: &str| {
            <ModelInferResponse as prost::Message>::decode(&b[..])
                .map_err(|e| format!("{whose} answer does not decode: {e}"))
        };
        let (primary, shadow) = match (
            decode(&self.primary, "the primary's"),
            decode(&answer, "the shadow's"),
        ) {
            (Ok(p), Ok(s)) => (p, s),
            (Err(e), _) | (_, Err(e)) => return rule.stats.failed(&rule.label, &self.req.id, &e),
        };
        // The primary answered from the shadow's own target: nothing to compare.
        if primary.model_name == model && primary.model_version == version.to_string() {
            return;
        }
        let c = compare::compare(&primary, &shadow, rule.rule.tolerance);
        let agree = rule.stats.compared(&rule.label, &self.req.id, &c);
        if let (Some(agree), Some(g)) = (agree, self.guard(same_model, version)) {
            g.compared(agree, self.policy.split.as_ref());
        }
    }

    /// The model's guard, when it guards the version this copy went to.
    fn guard(&self, same_model: bool, version: i64) -> Option<&guard::Guard> {
        self.policy
            .guard
            .as_ref()
            .filter(|g| same_model && g.rule.version == version)
    }

    /// Routes and balances the copy as any request (the target's newest version when the
    /// rule names none), then makes its one attempt.
    async fn send(&self, model: &str, same_model: bool) -> Sent {
        let rule = self.policy.shadow.as_ref().expect("a shadow rule");
        let all = self.pool.all();
        let version = rule
            .rule
            .version
            .map_or_else(String::new, |v| v.to_string());
        let target = match route::route(&all, model, &version, &Default::default()) {
            Ok(t) => t,
            Err(e) => return not_sent(e),
        };
        let Some((ep, _)) = balance::pick(&all, &target, &[]) else {
            return not_sent(route::no_worker(&all, model, &version));
        };
        let req = match same_model {
            true => self.req.clone(),
            false => match renamed(&self.req, model) {
                Ok(r) => Arc::new(r),
                Err(e) => return Sent::Failed(e),
            },
        };
        let span = infermesh_core::child_span!("shadow", otel.kind = "client", worker = %ep.addr);
        let call = ep.call();
        let carry = trace::Carry::default();
        let size = req.bytes.len();
        let result =
            upstream::attempt(&ep, &req, target.version, size, Some(TIMEOUT), &carry, span).await;
        call.ended();
        if let Some(g) = self.guard(same_model, target.version) {
            let judged = guard::judged(result.as_ref().err(), None);
            g.attempted(judged, self.policy.split.as_ref());
        }
        match result {
            Ok(answer) => Sent::Answer(answer.bytes, target.version),
            Err(status) => refused(&status, &ep.addr),
        }
    }
}

/// A target no worker can take now: not ready is a drop, no such model or version an error.
fn not_sent(e: Error) -> Sent {
    match e.code() {
        tonic::Code::Unavailable => Sent::Dropped(e.to_string()),
        _ => Sent::Failed(e.to_string()),
    }
}

/// A failed attempt: busy or not ready there is a drop, anything else an error.
fn refused(status: &Status, worker: &str) -> Sent {
    let why = format!("worker {worker}: {:?}: {}", status.code(), status.message());
    match status.code() {
        tonic::Code::ResourceExhausted | tonic::Code::Unavailable => Sent::Dropped(why),
        _ => Sent::Failed(why),
    }
}

/// The request for another model: its bytes with `model_name` written after them (the
/// last value of a field wins), read again as the worker will read it.
fn renamed(req: &RawRequest, model: &str) -> Result<RawRequest, String> {
    let mut bytes = BytesMut::with_capacity(req.bytes.len() + model.len() + 8);
    bytes.put_slice(&req.bytes);
    put_string(1, model, &mut bytes);
    RawRequest::decode(bytes.freeze()).map_err(|e| format!("the request does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_to_another_model_reads_as_that_model_and_sampling_is_exact() {
        let req = infermesh_proto::ModelInferRequest {
            model_name: "mlp".into(),
            model_version: "1".into(),
            id: "a".into(),
            ..Default::default()
        };
        let raw = RawRequest::decode(prost::Message::encode_to_vec(&req).into()).unwrap();
        let other = renamed(&raw, "mlp-candidate").unwrap();
        assert_eq!(
            (other.model_name.as_str(), other.id.as_str()),
            ("mlp-candidate", "a")
        );
        let decoded =
            <infermesh_proto::ModelInferRequest as prost::Message>::decode(&other.bytes[..])
                .unwrap();
        assert_eq!(decoded.model_name, "mlp-candidate");
        let shadow = rules::Shadow {
            model: None,
            version: Some(2),
            per_10k: 2_500,
            tolerance: compare::Tolerance {
                atol: 0.0,
                rtol: 0.0,
            },
        };
        let rule = Rule::new(
            shadow,
            "mlp:2".into(),
            Arc::new(Stats::new(
                "mlp",
                Default::default(),
                crate::metrics::abs_error(),
                crate::metrics::cosine(),
            )),
        );
        let copied: Vec<bool> = (0..8).map(|_| rule.sampled()).collect();
        assert_eq!(
            copied,
            [false, false, false, true, false, false, false, true]
        );
    }
}
