//! `infermesh.admin.v1.Routes`: what the routing file does right now, for
//! `infermesh routes` and grpcurl. Read-only (the `read` scope under auth).

use std::sync::{atomic::Ordering::Relaxed, Arc};

use infermesh_proto::admin::{
    routes_server::{Routes as RoutesApi, RoutesServer},
    GetRoutesRequest, GetRoutesResponse, Guard, Hedging, ModelRoute, Shadow, VersionShare,
};
use tonic::{Request, Response, Status};

use crate::{latency::MIN_HEDGE_SAMPLES, mesh::Forwarding, route::Policy, routes::After};

pub struct Admin {
    pub forwarding: Arc<Forwarding>,
}

impl Admin {
    pub fn server(forwarding: Arc<Forwarding>) -> RoutesServer<Self> {
        RoutesServer::new(Self { forwarding })
    }

    fn model(&self, model: &str, policy: &Policy) -> ModelRoute {
        let all = self.forwarding.pool.all();
        let ready = |v: i64| all.iter().any(|e| e.serves(model, Some(v)));
        let split = policy.split.as_ref().map_or_else(Vec::new, |s| {
            s.weights
                .iter()
                .zip(&policy.records.split)
                .map(|((version, weight), series)| {
                    let up = ready(*version);
                    let off = s.is_off(*version);
                    let skipped = match (up, s.fallback) {
                        _ if off => "the guard took it out of the split: its part goes to the other versions".into(),
                        (true, _) => String::new(),
                        (false, true) => {
                            "no ready worker: its part goes to the other versions (fallback)".into()
                        }
                        (false, false) => {
                            "no ready worker: its part fails with version-unavailable".into()
                        }
                    };
                    VersionShare {
                        version: *version,
                        weight: *weight,
                        weight_in_force: if !off && (up || !s.fallback) { *weight } else { 0 },
                        skipped,
                        routed: series[0].get() + series[1].get(),
                        unavailable: series[2].get(),
                    }
                })
                .collect()
        });
        let counts = &policy.records.counts;
        let hedging = policy.hedge.map(|after| {
            let (delay_ms, waiting) = self.delay(model, policy, after);
            Hedging {
                delay_ms,
                waiting,
                requests: counts.requests.load(Relaxed),
                hedged: counts.hedged.load(Relaxed),
                won: counts.won.load(Relaxed),
            }
        });
        ModelRoute {
            model: model.into(),
            split,
            fallback: policy.split.as_ref().is_some_and(|s| s.fallback),
            hedge: policy.hedge.map_or_else(String::new, |a| a.to_string()),
            hedging,
            shadow: policy.shadow.as_ref().map(shadow),
            guard: policy.guard.as_ref().map(guard),
        }
    }

    /// The hedge delay now, for the version requests that name none go to (the split's
    /// heaviest, else the newest ready one), or why there is none yet.
    fn delay(&self, model: &str, policy: &Policy, after: After) -> (f64, String) {
        let p = match after {
            After::Ms(ms) => return (ms, String::new()),
            After::Percentile(p) => p,
        };
        let all = self.forwarding.pool.all();
        let version = match &policy.split {
            Some(s) => Some(s.heaviest()),
            None => all.iter().filter_map(|e| e.newest(model)).max(),
        };
        let Some(version) = version else {
            return (0.0, "no ready worker has the model".into());
        };
        let latency = &self.forwarding.latency;
        match latency.quantile(model, version, p, MIN_HEDGE_SAMPLES) {
            Some(d) => (d.as_secs_f64() * 1000.0, String::new()),
            None => (
                0.0,
                format!(
                    "version {version}: {} of the {MIN_HEDGE_SAMPLES} answers p{p} needs",
                    latency.samples(model, version)
                ),
            ),
        }
    }
}

fn shadow(rule: &crate::shadow::Rule) -> Shadow {
    let t = rule.stats.totals();
    let compared = t.agree + t.disagree;
    Shadow {
        target: rule.label.clone(),
        percent: f64::from(rule.rule.per_10k) / 100.0,
        atol: rule.rule.tolerance.atol,
        rtol: rule.rule.tolerance.rtol,
        agree: t.agree,
        disagree: t.disagree,
        error: t.error,
        dropped: t.dropped,
        agreement: if compared == 0 {
            0.0
        } else {
            t.agree as f64 / compared as f64
        },
        worst_abs_error: t.worst,
        argmax_changed: t.argmax_changed,
        argmax_rows: t.argmax_rows,
        last_error: t.last_error,
        in_flight: rule.in_flight() as u32,
    }
}

fn guard(g: &crate::guard::Guard) -> Guard {
    let v = g.view();
    Guard {
        version: g.rule.version,
        max_error_rate: g.rule.max_error_rate,
        min_agreement: g.rule.min_agreement,
        window_s: g.rule.window_s,
        min_requests: g.rule.min_requests,
        requests: v.requests,
        errors: v.errors,
        comparisons: v.compared,
        agreed: v.agree,
        armed: v.armed,
        tripped: v.tripped.is_some(),
        why: v.tripped.or(v.withheld).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl RoutesApi for Admin {
    async fn get(
        &self,
        req: Request<GetRoutesRequest>,
    ) -> Result<Response<GetRoutesResponse>, Status> {
        // Under auth, a tenant sees the routes of its own models only (as RepositoryIndex).
        let caller = infermesh_core::auth::caller(&req);
        let open = |model: &str| caller.as_ref().is_none_or(|c| c.allows_model(model));
        let routes = &self.forwarding.routes;
        let table = routes.current();
        Ok(Response::new(GetRoutesResponse {
            file: routes
                .path
                .as_ref()
                .map_or_else(String::new, |p| p.display().to_string()),
            reloads: routes.reloads(),
            models: table
                .models()
                .into_iter()
                .filter(|(m, _)| open(m))
                .map(|(m, p)| self.model(m, p))
                .collect(),
        }))
    }
}
