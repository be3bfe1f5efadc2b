//! The composition the gateway serves with: route, balance, attempts and what they teach,
//! over the pool's workers, as the forward path's `Mesh`. Each step is its own module
//! (`route`, `balance`, `endpoint`); this one only puts them together.

use std::{sync::Arc, time::Duration};

use infermesh_core::{trace, Error};
use infermesh_proto as pb;
use tonic::Status;
use tracing::field::Empty;

use crate::{
    balance,
    endpoint::{upstream, Endpoint},
    failure::Failure,
    forward,
    latency::Latencies,
    pool::Pool,
    route::{self, Policy, Target},
};

/// One request's view of the workers: the pool as it is when the request arrives.
pub struct Workers<'a> {
    all: Vec<Arc<Endpoint>>,
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
        req: pb::ModelInferRequest,
        left: Option<Duration>,
        n: usize,
    ) -> impl std::future::Future<Output = Result<pb::ModelInferResponse, Status>> + Send {
        let ep = ep.clone();
        async move {
            let span = infermesh_core::child_span!(
                "forward",
                otel.kind = "client",
                worker = %ep.addr,
                attempt = n,
            );
            let _call = ep.call();
            upstream::attempt(&ep, req, self.size, left, self.carry, span).await
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
}

/// A worker for a call about one model that is not inference (metadata, config, ready):
/// routed and balanced as inference is. Returns the worker and the version to ask it for.
pub fn pick(pool: &Pool, model: &str, version: &str) -> Result<(Arc<Endpoint>, String), Error> {
    let all = pool.all();
    let target = route::route(&all, model, version, &Default::default())?;
    let (ep, _) =
        balance::pick(&all, &target, &[]).ok_or_else(|| route::no_worker(&all, model, version))?;
    Ok((ep, target.version.to_string()))
}
