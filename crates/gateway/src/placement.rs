//! Placement at the gateway: a request for a model that no ready worker holds, where
//! workers run in placement mode (`--model-control-mode placement`), has the model
//! loaded first. The workers are ranked for the model by rendezvous hashing (`rank`), the
//! same in every gateway replica: the first is asked to load it; one that refuses
//! (over-capacity, or a failed load) passes it to the next. Meanwhile the request waits
//! in a bounded per-model queue, within its deadline; concurrent requests share one load.
//! A churn-guard refusal from every worker is not final: the request waits and asks
//! again until its deadline. Everything is learned from the workers' change streams; no
//! store is shared between gateways.

pub mod describe;
mod keeper;
mod metrics;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use infermesh_core::{reason, text::clip, Reason};
use infermesh_proto::RepositoryModelLoadRequest;
use tokio::time::Instant;
use tonic::{Code, Status};

pub use keeper::Scaling;
pub use metrics::PlacementMetrics;

use crate::{endpoint::Endpoint, pool::Pool, rank};

/// What one round of asking workers to load a model came to.
#[derive(Clone, Debug)]
enum Placed {
    /// A worker holds it ready now.
    Ready,
    /// Every worker that could take it refused for the churn guard: ask again later.
    Retry(Status),
    /// No worker could take it.
    Failed(Status),
}

type Flight = Shared<BoxFuture<'static, Placed>>;

pub struct Placer {
    pool: Arc<Pool>,
    /// The load round under way for each model: later requests join it.
    flights: Mutex<HashMap<String, Flight>>,
    /// Requests waiting for each model.
    waiting: Mutex<HashMap<String, usize>>,
    max_queue: usize,
    load_timeout: Duration,
    pub metrics: PlacementMetrics,
    /// Per-model copies (`copies: {min, max}`) come from the routing file.
    routes: Arc<crate::routes::Routes>,
    scaling: Scaling,
    keeping: keeper::Keeping,
    /// How long a draining worker keeps its models' requests while they move.
    drain_timeout: Duration,
}

/// The placer's settings (the gateway's `--placement-*` flags).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub max_queue: usize,
    pub load_timeout: Duration,
    pub scaling: Scaling,
    pub drain_timeout: Duration,
}

/// The worker's load parameter that pins a model (never evicted).
const PIN: &str = "infermesh_pin";

/// How long a churn-guarded request waits before its model's workers are asked again.
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// After a load that answered OK, how long the worker's change stream may take to say the
/// model is ready before the gateway asks its index.
const SEEN_WITHIN: Duration = Duration::from_secs(2);

impl Placer {
    pub fn new(
        pool: Arc<Pool>,
        routes: Arc<crate::routes::Routes>,
        settings: Settings,
        metrics: PlacementMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            flights: Mutex::default(),
            waiting: Mutex::default(),
            max_queue: settings.max_queue,
            load_timeout: settings.load_timeout,
            metrics,
            routes,
            scaling: settings.scaling,
            keeping: Default::default(),
            drain_timeout: settings.drain_timeout,
        })
    }

    /// Returns once a ready worker holds `model` (at `version`, when named), having it
    /// loaded first when none does and placement-mode workers list it; at once for a
    /// model no placement-mode worker lists (forwarding gives its usual answer).
    pub async fn ensure(
        self: &Arc<Self>,
        model: &str,
        version: Option<i64>,
        deadline: Option<Instant>,
    ) -> Result<(), Status> {
        let all = self.pool.all();
        if all.iter().any(|e| e.serves(model, version)) {
            if all.iter().any(|e| e.placing()) {
                PlacementMetrics::count(&self.metrics.requests, "hit");
            }
            return Ok(());
        }
        if !all.iter().any(|e| e.places(model)) {
            return Ok(());
        }
        // Loaded, but no worker lists the version asked for: nothing to load, and
        // forwarding answers NOT_FOUND naming the versions there are.
        if let Some(v) = version {
            if all.iter().any(|e| e.serves(model, None)) && !all.iter().any(|e| e.lists(model, v)) {
                return Ok(());
            }
        }
        PlacementMetrics::count(&self.metrics.requests, "cold");
        let _slot = self.queue(model)?;
        let started = Instant::now();
        let result = self.wait(model, deadline).await;
        self.metrics
            .cold_wait
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn wait(self: &Arc<Self>, model: &str, deadline: Option<Instant>) -> Result<(), Status> {
        loop {
            let flight = self.flight(model);
            let placed = match deadline {
                Some(d) => tokio::time::timeout_at(d, flight)
                    .await
                    .map_err(|_| waited_too_long(model))?,
                None => flight.await,
            };
            match placed {
                Placed::Ready => return Ok(()),
                Placed::Failed(status) => return Err(status),
                Placed::Retry(status) => {
                    // Without a deadline there is nothing to wait within.
                    let Some(d) = deadline else {
                        return Err(status);
                    };
                    if Instant::now() + RETRY_AFTER >= d {
                        return Err(status);
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// A place in `model`'s queue, held until dropped; RESOURCE_EXHAUSTED when full.
    fn queue(self: &Arc<Self>, model: &str) -> Result<Slot, Status> {
        let mut waiting = self.waiting.lock().expect("placement lock");
        let n = waiting.entry(model.to_string()).or_default();
        if *n >= self.max_queue {
            return Err(reason::status(
                Code::ResourceExhausted,
                format!(
                    "model '{}' is being loaded and {} requests already wait for it (--placement-queue)",
                    clip(model),
                    self.max_queue
                ),
                Reason::PlacementQueueFull,
            ));
        }
        *n += 1;
        self.gauge(model).set(*n as i64);
        Ok(Slot {
            placer: self.clone(),
            model: model.to_string(),
        })
    }

    fn gauge(&self, model: &str) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .queue
            .get_or_create(&metrics::ModelLabels {
                model: model.to_string(),
            })
            .clone()
    }

    /// The load round under way for `model`, or a new one; it runs as its own task, so
    /// it finishes even if every request waiting for it goes away.
    fn flight(self: &Arc<Self>, model: &str) -> Flight {
        let mut flights = self.flights.lock().expect("placement lock");
        if let Some(f) = flights.get(model) {
            return f.clone();
        }
        let (me, name) = (self.clone(), model.to_string());
        let task = tokio::spawn(async move {
            let placed = me.place(&name).await;
            me.flights.lock().expect("placement lock").remove(&name);
            placed
        });
        let flight = async move {
            task.await.unwrap_or_else(|e| {
                Placed::Failed(Status::internal(format!("model placement panicked: {e}")))
            })
        }
        .boxed()
        .shared();
        flights.insert(model.to_string(), flight.clone());
        flight
    }

    /// One round: the workers that list the model, in its ranking, asked in turn.
    async fn place(&self, model: &str) -> Placed {
        let all = self.pool.all();
        let candidates: Vec<&Arc<Endpoint>> = all.iter().filter(|e| e.places(model)).collect();
        let addrs: Vec<&str> = candidates.iter().map(|e| e.addr.as_str()).collect();
        // Each worker asked: what it said, and its reason.
        let mut refusals: Vec<(String, Option<Reason>)> = Vec::new();
        for addr in rank::rank(model, &addrs) {
            let ep = candidates
                .iter()
                .find(|e| e.addr == addr)
                .expect("ranked from the candidates");
            if all.iter().any(|e| e.serves(model, None)) {
                return Placed::Ready; // another gateway's load, seen meanwhile
            }
            match self.load_on(ep, model, false).await {
                Ok(()) => return Placed::Ready,
                Err((why, reason)) => refusals.push((format!("{addr} ({why})"), reason)),
            }
        }
        if all.iter().any(|e| e.serves(model, None)) {
            return Placed::Ready;
        }
        let model = clip(model);
        let tried = if refusals.is_empty() {
            "no placement-mode worker is ready".to_string()
        } else {
            let lines: Vec<&str> = refusals.iter().map(|(line, _)| line.as_str()).collect();
            lines.join(", ")
        };
        let reasons = || refusals.iter().map(|(_, reason)| *reason);
        if reasons().any(|r| r == Some(Reason::ChurnGuard)) {
            return Placed::Retry(reason::status(
                Code::ResourceExhausted,
                format!("model '{model}' could not be loaded before the deadline: {tried}"),
                Reason::ChurnGuard,
            ));
        }
        if !refusals.is_empty() && reasons().all(|r| r == Some(Reason::OverCapacity)) {
            return Placed::Failed(reason::status(
                Code::ResourceExhausted,
                format!("no worker has room for model '{model}': {tried}"),
                Reason::OverCapacity,
            ));
        }
        Placed::Failed(reason::status(
            Code::Unavailable,
            format!("model '{model}' could not be loaded on any worker: {tried}"),
            Reason::ModelNotReady,
        ))
    }

    /// Asks `ep` to load `model` (pinned there: `pin`) and waits until it is seen ready
    /// there; else why not, and the reason the worker gave.
    async fn load_on(
        &self,
        ep: &Endpoint,
        model: &str,
        pin: bool,
    ) -> Result<(), (String, Option<Reason>)> {
        let mut client = ep.client.clone();
        let parameters = match pin {
            true => [(
                PIN.to_string(),
                infermesh_proto::ModelRepositoryParameter {
                    parameter_choice: Some(
                        infermesh_proto::model_repository_parameter::ParameterChoice::BoolParam(
                            true,
                        ),
                    ),
                },
            )]
            .into(),
            false => Default::default(),
        };
        let asked = client.repository_model_load(RepositoryModelLoadRequest {
            model_name: model.to_string(),
            parameters,
            ..Default::default()
        });
        let status = match tokio::time::timeout(self.load_timeout, asked).await {
            Ok(Ok(_)) => {
                // Any version will do: a version the model does not have is forwarding's
                // NOT_FOUND, not a reason to load it anywhere else.
                if !ep.wait_serving(model, None, SEEN_WITHIN).await {
                    ep.refresh_index(SEEN_WITHIN).await;
                }
                if ep.serves(model, None) {
                    PlacementMetrics::count(&self.metrics.loads, "loaded");
                    tracing::info!(model = %clip(model), worker = %ep.addr, "model placed");
                    return Ok(());
                }
                Status::unavailable("loaded, but no version is ready")
            }
            Ok(Err(status)) => status,
            Err(_) => {
                Status::deadline_exceeded(format!("no answer within {:?}", self.load_timeout))
            }
        };
        let why = reason::of_status(&status);
        match why {
            Some(r @ (Reason::OverCapacity | Reason::ChurnGuard)) => self.metrics.refused(r),
            _ => PlacementMetrics::count(&self.metrics.loads, "failed"),
        }
        tracing::info!(model = %clip(model), worker = %ep.addr, code = ?status.code(), message = status.message(), "model load refused");
        Err((crate::endpoint::describe(&status), why))
    }

    /// Whether a failed request's model is one no ready worker holds any more, but a
    /// placement-mode worker could load (it was evicted while the request was routed).
    pub fn lost(&self, model: &str, status: &Status) -> bool {
        if !matches!(status.code(), Code::Unavailable | Code::NotFound) {
            return false;
        }
        let all = self.pool.all();
        !all.iter().any(|e| e.serves(model, None)) && all.iter().any(|e| e.places(model))
    }
}

/// The deadline passed while the model was being loaded.
fn waited_too_long(model: &str) -> Status {
    reason::status(
        Code::DeadlineExceeded,
        format!(
            "deadline passed while model '{}' was being loaded",
            clip(model)
        ),
        Reason::Deadline,
    )
}

/// A request's place in its model's queue.
struct Slot {
    placer: Arc<Placer>,
    model: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut waiting = self.placer.waiting.lock().expect("placement lock");
        if let Some(n) = waiting.get_mut(&self.model) {
            *n -= 1;
            self.placer.gauge(&self.model).set(*n as i64);
            if *n == 0 {
                waiting.remove(&self.model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placer() -> Arc<Placer> {
        let pool = Pool::new(
            Duration::from_secs(1),
            Default::default(),
            Default::default(),
        );
        let routes = crate::routes::Routes::load(None, Default::default()).unwrap();
        let settings = Settings {
            max_queue: 2,
            load_timeout: Duration::from_secs(1),
            scaling: Scaling {
                inflight: 4.0,
                window: Duration::from_secs(5),
            },
            drain_timeout: Duration::from_secs(30),
        };
        Placer::new(pool, routes, settings, Default::default())
    }

    #[tokio::test]
    async fn the_queue_is_bounded_per_model_and_frees_its_places() {
        let placer = placer();
        let first = placer.queue("m").unwrap();
        let _second = placer.queue("m").unwrap();
        let Err(full) = placer.queue("m") else {
            panic!("a third request queued for m");
        };
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(reason::of_status(&full), Some(Reason::PlacementQueueFull));
        assert!(full.message().contains("--placement-queue"), "{full:?}");
        let _other = placer.queue("other").expect("each model has its own queue");
        assert_eq!(placer.gauge("m").get(), 2);
        drop(first);
        assert_eq!(placer.gauge("m").get(), 1);
        let _again = placer.queue("m").expect("a place freed");
    }

    #[tokio::test]
    async fn a_model_no_placement_worker_lists_is_left_to_forwarding() {
        let placer = placer();
        placer.ensure("m", None, None).await.unwrap();
        assert!(!placer.lost("m", &Status::unavailable("gone")));
    }
}
