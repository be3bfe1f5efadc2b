//! The composition the gateway serves with: route, balance, attempts and what they teach,
//! over the pool's workers, as the forward path's `Mesh`. Each step is its own module
//! (`route`, `balance`, `endpoint`); this one only puts them together.

use std::{sync::Arc, time::Duration};

use infermesh_core::{
    raw::{RawAnswer, RawRequest},
    reason, trace, Error, Reason,
};
use tonic::Status;
// deposit() of the retry budget.
use tower::retry::budget::Budget as _;
use tracing::field::Empty;

use crate::{
    balance,
    endpoint::{upstream, Endpoint},
    failure::Failure,
    forward,
    latency::Latencies,
    metrics::GatewayMetrics,
    poison::{self, Quarantine},
    pool::Pool,
    retry::Budget,
    route::{self, Policy, Target},
    routes::{After, Routes},
};
use infermesh_core::admission::ByteBudget;

/// What the forward path needs for this gateway, beyond one request: the workers, the
/// routing policy, answer times, the retry budget and the quarantine.
pub struct Forwarding {
    pub pool: Arc<Pool>,
    /// The routing file's policy of every model.
    pub routes: Arc<Routes>,
    /// Each model version's recent answer times (the per-attempt timeout).
    pub latency: Latencies,
    pub budget: Budget,
    pub quarantine: Quarantine,
    pub metrics: GatewayMetrics,
    /// The gateway's byte budget: hedged copies count against it as client requests do.
    pub bytes: ByteBudget,
    /// Copies of answered requests to the routing file's shadow targets.
    pub shadows: crate::shadow::Shadows,
    /// Loads models on placement-mode workers when no ready worker holds them.
    pub placer: Arc<crate::placement::Placer>,
    /// Where each open sequence (Triton's sequence_id) is held.
    pub sticky: crate::sequence::Sticky,
}

impl Forwarding {
    /// Refuses a quarantined request, else forwards it (route → forward → balance →
    /// endpoint) over this gateway's workers.
    pub async fn forward(
        &self,
        mut req: RawRequest,
        size: usize,
        deadline: Option<std::time::Instant>,
        carry: &trace::Carry,
    ) -> Result<RawAnswer, Status> {
        self.budget.deposit();
        let asked_version = std::mem::take(&mut req.model_version);
        if self.quarantine.is_active() {
            let fp = self.quarantine.fingerprint(&req, &asked_version);
            if let Some(left) = self.quarantine.refused(fp) {
                return Err(reason::status(
                    tonic::Code::Unavailable,
                    format!(
                        "request refused: an identical request broke {} workers (fingerprint {fp:016x}); refused for {}s more",
                        poison::MAX_BREAKS,
                        left.as_secs()
                    ),
                    Reason::Quarantined,
                ));
            }
        }
        let deadline = deadline.map(tokio::time::Instant::from_std);
        let named = asked_version.parse::<i64>().ok();
        self.placer.ensure(&req.model_name, named, deadline).await?;
        let table = self.routes.current();
        let policy = table.policy(&req.model_name);
        if let Some(seq) = crate::sequence::of(&req.parameters)? {
            let req = Arc::new(req);
            return self
                .sequenced(&req, &seq, &asked_version, policy, size, deadline, carry)
                .await;
        }
        let mesh = Workers::new(&self.pool, policy, &self.latency, size, carry);
        let retries = forward::Retries {
            budget: &self.budget,
            quarantine: &self.quarantine,
            metrics: &self.metrics,
            bytes: Some(&self.bytes),
        };
        // Shared by every attempt: each is encoded from it, none copies it.
        let req = Arc::new(req);
        let mut answer = forward::forward(&mesh, &retries, &req, &asked_version, deadline).await;
        if answer
            .as_ref()
            .is_err_and(|s| self.placer.lost(&req.model_name, s))
        {
            // Evicted between the check and the attempt: loaded again, tried once more.
            self.placer.ensure(&req.model_name, named, deadline).await?;
            let mesh = Workers::new(&self.pool, policy, &self.latency, size, carry);
            answer = forward::forward(&mesh, &retries, &req, &asked_version, deadline).await;
        }
        if let (Ok(answer), Some(_)) = (&answer, &policy.shadow) {
            self.shadows.offer(policy, &req, answer);
        }
        answer
    }
}

impl Forwarding {
    /// A request of a sequence: on the sequence's worker, once (never retried elsewhere,
    /// hedged or shadowed: its state lives there). A worker gone under it is the
    /// sequence's state lost (`sequence-lost`).
    #[allow(clippy::too_many_arguments)]
    async fn sequenced(
        &self,
        req: &Arc<RawRequest>,
        seq: &crate::sequence::Sequence,
        version: &str,
        policy: &Arc<Policy>,
        size: usize,
        deadline: Option<tokio::time::Instant>,
        carry: &trace::Carry,
    ) -> Result<RawAnswer, Status> {
        let all = self.pool.all();
        let model = &req.model_name;
        let (ep, version) = self.sticky.worker(&all, model, seq, || {
            route::route(&all, model, version, policy).map_err(Status::from)
        })?;
        let left = forward::time_left(deadline, tokio::time::Instant::now())?;
        let span = infermesh_core::child_span!(
            "forward",
            otel.kind = "client",
            worker = %ep.addr,
            attempt = 1,
        );
        let call = ep.call();
        let result = upstream::attempt(&ep, req, version, size, left, carry, span).await;
        call.ended();
        match result {
            Ok(answer) => {
                ep.succeeded();
                if seq.end {
                    self.sticky.ended(model, seq);
                }
                Ok(answer)
            }
            Err(status) => {
                let failure = crate::failure::classify(&status);
                ep.note_failure(model, failure, &status);
                match failure {
                    Failure::Broken | Failure::Refusing => {
                        Err(self.sticky.lost(model, seq, &ep.addr))
                    }
                    _ => Err(status),
                }
            }
        }
    }
}

/// One request's view of the workers: the pool as it is when the request arrives.
pub struct Workers<'a> {
    all: Arc<Vec<Arc<Endpoint>>>,
    policy: &'a Arc<Policy>,
    latency: &'a Latencies,
    /// The request's encoded length (the trace parameters an attempt adds are a few dozen
    /// bytes, nothing next to the stream threshold).
    size: usize,
    carry: &'a trace::Carry,
}

impl<'a> Workers<'a> {
    pub fn new(
        pool: &Pool,
        policy: &'a Arc<Policy>,
        latency: &'a Latencies,
        size: usize,
        carry: &'a trace::Carry,
    ) -> Self {
        Self {
            all: pool.all(),
            policy,
            latency,
            size,
            carry,
        }
    }
}

impl forward::Mesh for Workers<'_> {
    type Worker = Arc<Endpoint>;

    fn route(&self, model: &str, version: &str) -> Result<Target, Error> {
        route::route(&self.all, model, version, self.policy)
    }

    fn reroute(&self, target: &Target, without: &[i64]) -> Option<Target> {
        route::reroute(&self.all, target, without)
    }

    fn balance(&self, target: &Target, tried: &[String]) -> Option<(Arc<Endpoint>, bool)> {
        let span = infermesh_core::child_span!("route", model = %target.model, worker = Empty);
        let _entered = span.enter();
        let chosen = balance::pick(&self.all, target, tried)?;
        span.record("worker", chosen.0.addr.as_str());
        Some(chosen)
    }

    fn no_worker(&self, target: &Target) -> Error {
        route::no_worker(&self.all, &target.model, &target.selector.asked())
    }

    fn addr(ep: &Arc<Endpoint>) -> &str {
        &ep.addr
    }

    fn attempt(
        &self,
        ep: &Arc<Endpoint>,
        req: &Arc<RawRequest>,
        version: i64,
        left: Option<Duration>,
        n: usize,
    ) -> impl std::future::Future<Output = Result<RawAnswer, Status>> + Send {
        let ep = ep.clone();
        async move {
            let span = infermesh_core::child_span!(
                "forward",
                otel.kind = "client",
                worker = %ep.addr,
                attempt = n,
            );
            let call = ep.call();
            let result =
                upstream::attempt(&ep, req, version, self.size, left, self.carry, span).await;
            call.ended();
            result
        }
    }

    fn learn(&self, ep: &Arc<Endpoint>, model: &str, failed: Option<(Failure, &Status)>) {
        match failed {
            None => ep.succeeded(),
            Some((failure, status)) => ep.note_failure(model, failure, status),
        }
    }

    fn p99(&self, target: &Target) -> Option<Duration> {
        self.latency.p99(&target.model, target.version)
    }

    fn observe(&self, target: &Target, took: Duration) {
        self.latency.observe(&target.model, target.version, took);
    }

    fn hedge_after(&self, target: &Target) -> Option<Duration> {
        match target.policy.hedge? {
            After::Ms(ms) => Some(Duration::from_secs_f64(ms / 1000.0)),
            After::Percentile(p) => self.latency.quantile(
                &target.model,
                target.version,
                p,
                crate::latency::MIN_HEDGE_SAMPLES,
            ),
        }
    }
}

/// A worker for a call about one model that is not inference (metadata, config, ready):
/// routed and balanced as inference is, except that a model whose routing file splits it
/// answers for its heaviest version, so a client that reads metadata first sees one
/// consistent version. Returns the worker and the version to ask it for.
/// (`routes` None: the newest version, as ModelReady asks whether any version is.)
pub fn pick(
    pool: &Pool,
    routes: Option<&Routes>,
    model: &str,
    version: &str,
) -> Result<(Arc<Endpoint>, String), Error> {
    let all = pool.all();
    let table = routes.map(Routes::current);
    let split = table.as_ref().and_then(|t| t.policy(model).split.as_ref());
    let heaviest = match (version, split) {
        ("", Some(split)) => split.heaviest().to_string(),
        _ => version.to_string(),
    };
    let target = route::route(&all, model, &heaviest, &Default::default())?;
    let (ep, _) = balance::pick(&all, &target, &[])
        .ok_or_else(|| route::no_worker(&all, model, &heaviest))?;
    Ok((ep, target.version.to_string()))
}
