//! `inference.GRPCInferenceService` at the gateway: inference is balanced per request
//! (and per stream message); metadata comes from a worker holding the model; readiness,
//! the repository index and statistics are aggregates over workers. Workers' statuses pass
//! through unchanged.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;
use infermesh_core::{
    admission::ByteBudget,
    auth, frame, metrics,
    raw::{RawAnswer, RawRequest, RawStreamed},
    stream::{ResponseStream, UNORDERED},
    text::clip,
    trace, Error as RequestError, Lifecycle,
};
use infermesh_proto::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use tonic::{Request, Response, Status, Streaming};

use crate::single_flight::SingleFlight;
use crate::{
    config::ControlMode,
    endpoint::Endpoint,
    mesh,
    metrics::{GatewayMetrics, OpenGauge},
    pool::Pool,
    stats::StatsCache,
};

const EXTENSIONS: &[&str] = &[
    "classification",
    "model_configuration",
    "model_repository",
    "sequence",
    "statistics",
];

#[derive(Clone)]
pub struct GatewayService {
    pub pool: Arc<Pool>,
    pub lifecycle: Lifecycle,
    pub stats: Arc<StatsCache>,
    pub control: ControlMode,
    pub max_stream_inflight: usize,
    /// Request bytes held until their worker answers (`--max-inflight-bytes`).
    pub bytes: ByteBudget,
    /// Where inference requests go: route → forward → balance → endpoint.
    pub forwarding: Arc<mesh::Forwarding>,
    /// Concurrent fan-out calls share one round of worker calls.
    pub flights: Arc<Flights>,
    pub metrics: GatewayMetrics,
}

/// Each worker's answer to one round of a fan-out call, by address.
type Answers<T> = Vec<(String, Option<T>)>;

/// The fan-out calls that run in single flight (see `single_flight`).
#[derive(Default)]
pub struct Flights {
    index: SingleFlight<Answers<pb::RepositoryIndexResponse>>,
    statistics: SingleFlight<Answers<pb::ModelStatisticsResponse>>,
}

/// Refreshes what each worker is known to serve, now (after a Load or Unload).
async fn learn_now(workers: &[Arc<crate::endpoint::Endpoint>]) {
    const WITHIN: Duration = Duration::from_secs(5);
    join_all(workers.iter().map(|ep| ep.refresh_index(WITHIN))).await;
}

/// Asks every worker in `workers` at once (`call` makes one worker's call).
async fn fan_out<T, F>(
    workers: Arc<Vec<Arc<crate::endpoint::Endpoint>>>,
    call: impl Fn(Arc<crate::endpoint::Endpoint>) -> F,
) -> Answers<T>
where
    F: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
{
    let answers = join_all(workers.iter().cloned().map(call)).await;
    workers
        .iter()
        .zip(answers)
        .map(|(ep, a)| (ep.addr.clone(), a.ok().map(Response::into_inner)))
        .collect()
}

type Result<T> = std::result::Result<Response<T>, Status>;

const PASS_THROUGH: &str = "served by the gateway's pass-through route";

impl GatewayService {
    /// The worker for a metadata or config call about `model` (routed as `mesh::pick`
    /// routes it), with `version` set to the version to ask it for.
    fn pick_model(
        &self,
        caller: Option<&auth::Caller>,
        model: &str,
        version: &mut String,
    ) -> std::result::Result<Arc<Endpoint>, Status> {
        let (ep, picked) = mesh::pick(&self.pool, Some(&self.forwarding.routes), model, version)
            .map_err(|e| self.scrub(caller, e.into()))?;
        *version = picked;
        Ok(ep)
    }

    /// Has `model` loaded on a placement-mode worker first, when none holds it (metadata
    /// and config are read from a worker that holds the model).
    async fn placed(
        &self,
        caller: Option<&auth::Caller>,
        model: &str,
        version: &str,
    ) -> std::result::Result<(), Status> {
        let named = version.parse::<i64>().ok();
        self.forwarding
            .placer
            .ensure(model, named, None)
            .await
            .map_err(|s| self.scrub(caller, s))
    }

    /// ModelInfer on the bytes that came (see `pass_through`).
    pub async fn model_infer_raw(
        &self,
        req: Request<RawRequest>,
    ) -> std::result::Result<Response<RawAnswer>, Status> {
        frame::unary(req, &self.lifecycle, &self.bytes, |call| async move {
            self.infer(call.req, call.deadline, call.carry, call.caller.as_ref())
                .await
                .map_err(|s| self.scrub(call.caller.as_ref(), s))
        })
        .await
    }

    /// ModelStreamInfer on the bytes that came. Each message is balanced on its own, so
    /// one busy stream spreads over every worker. A stream may mix models, and each
    /// message counts against the tenant's quotas; a refused message gets its error and
    /// the stream goes on.
    pub fn model_stream_infer_raw(
        self: &Arc<Self>,
        req: Request<Streaming<RawRequest>>,
    ) -> std::result::Result<Response<ResponseStream<RawStreamed>>, Status> {
        let svc = self.clone();
        let open = Arc::new(OpenGauge::new(&self.metrics.open_streams));
        let opts = frame::StreamFrame {
            max_in_flight: self.max_stream_inflight,
            mesh_parameters: false,
            replies: self.bytes.clone(),
        };
        frame::stream(req, &self.lifecycle, opts, move |call| {
            let _open = &open; // lives as long as the stream
            let svc = svc.clone();
            async move {
                svc.infer(call.req, call.deadline, call.carry, call.caller.as_ref())
                    .await
                    .map_err(|s| svc.scrub(call.caller.as_ref(), s))
            }
        })
    }

    /// Forwards one inference request to the worker the balancer picks. Its bytes pass
    /// through as they came, and the worker's answer goes back as it wrote it. A failure
    /// that means the request did not run (worker unavailable or draining, model gone
    /// there, queue full) is retried on another worker while the deadline and the retry
    /// budget allow; every other status passes through unchanged.
    /// `caller`: the tenant auth found, named to the worker (its response cache keeps
    /// tenants apart by it).
    pub async fn infer(
        &self,
        mut req: RawRequest,
        deadline: Option<Instant>,
        carry: trace::Carry,
        caller: Option<&auth::Caller>,
    ) -> std::result::Result<RawAnswer, Status> {
        req.tenant = caller.map(|c| c.tenant().to_string());
        let known = self.pool.knows(&req.model_name);
        let series = self.metrics.model(match known {
            true => &req.model_name,
            false => metrics::UNKNOWN,
        });
        let mut record =
            metrics::RequestRecord::new(|code, _version, took| series.record(code, took));
        infermesh_core::busy_poll::touch();
        // It counts against the budget and picks stream or unary forwarding.
        let size = req.bytes.len();
        let held = self.bytes.acquire(size);
        let result = match (internal_parameter(&req), held) {
            (Some(status), _) => Err(status),
            (None, Err(e)) => Err(e.into()),
            (None, Ok(_held)) => self.forwarding.forward(req, size, deadline, &carry).await,
        }
        .map_err(capped);
        infermesh_core::busy_poll::touch();
        record.finish(
            result
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
            "",
        );
        if let Err(status) = &result {
            tracing::debug!(trace_id = %trace::trace_id(), code = ?status.code(), message = status.message(), "request failed");
        }
        trace::finish(&trace::current(), result.as_ref().err());
        result
    }
}

/// No status message longer than 4 KiB leaves the gateway, whatever a worker said.
fn capped(status: Status) -> Status {
    if status.message().len() <= infermesh_core::text::MAX_MESSAGE_BYTES {
        return status;
    }
    let message = infermesh_core::text::cap_message(status.message().to_string());
    // The details (the reason) travel on unchanged.
    Status::with_details(status.code(), message, status.details().to_vec().into())
}

/// Request parameters with the `infermesh_` prefix belong to the mesh; a client may set
/// only `infermesh_unordered`.
fn internal_parameter(req: &RawRequest) -> Option<Status> {
    let key = req
        .parameters
        .keys()
        .find(|k| k.starts_with("infermesh_") && k.as_str() != UNORDERED)?;
    Some(infermesh_core::reason::status(
        tonic::Code::InvalidArgument,
        format!(
            "parameter '{}': the infermesh_ prefix is reserved for the mesh; clients may set only {UNORDERED}",
            clip(key)
        ),
        infermesh_core::Reason::Invalid,
    ))
}

#[tonic::async_trait]
impl GrpcInferenceService for GatewayService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<pb::ServerLiveResponse> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<pb::ServerReadyResponse> {
        let ready = self.pool.any_ready() && !self.lifecycle.is_draining();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<pb::ModelReadyResponse> {
        auth::check_model(&req, &req.get_ref().name)?;
        let req = req.into_inner();
        // A model a placement-mode worker can load is ready to be served: the first
        // request has it loaded (as ModelMesh reports its catalog).
        let placeable =
            req.version.is_empty() && self.pool.all().iter().any(|e| e.places(&req.name));
        let ready = (placeable || mesh::pick(&self.pool, None, &req.name, &req.version).is_ok())
            && !self.lifecycle.is_draining();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<pb::ServerMetadataResponse> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "infermesh-gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<pb::ModelMetadataResponse> {
        auth::check_model(&req, &req.get_ref().name)?;
        let caller = auth::caller(&req);
        let mut req = req.into_inner();
        self.placed(caller.as_ref(), &req.name, &req.version)
            .await?;
        let ep = self.pick_model(caller.as_ref(), &req.name, &mut req.version)?;
        Ok(Response::new(
            ep.client
                .clone()
                .model_metadata(req)
                .await
                .map_err(|e| self.scrub(caller.as_ref(), e))?
                .into_inner(),
        ))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<pb::ModelConfigResponse> {
        auth::check_model(&req, &req.get_ref().name)?;
        let caller = auth::caller(&req);
        let mut req = req.into_inner();
        self.placed(caller.as_ref(), &req.name, &req.version)
            .await?;
        let ep = self.pick_model(caller.as_ref(), &req.name, &mut req.version)?;
        Ok(Response::new(
            ep.client
                .clone()
                .model_config(req)
                .await
                .map_err(|e| self.scrub(caller.as_ref(), e))?
                .into_inner(),
        ))
    }

    /// Never called: `pass_through` serves ModelInfer on the bytes that came.
    async fn model_infer(
        &self,
        _: Request<pb::ModelInferRequest>,
    ) -> Result<pb::ModelInferResponse> {
        Err(Status::unimplemented(PASS_THROUGH))
    }

    type ModelStreamInferStream = infermesh_core::stream::ResponseStream;

    /// Never called: `pass_through` serves ModelStreamInfer on the bytes that came.
    async fn model_stream_infer(
        &self,
        _: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Self::ModelStreamInferStream> {
        Err(Status::unimplemented(PASS_THROUGH))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<pb::ModelStatisticsResponse> {
        let caller = auth::caller(&req);
        if !req.get_ref().name.is_empty() {
            auth::check_model(&req, &req.get_ref().name)?;
        }
        let req = req.into_inner();
        let workers = self.pool.all();
        let reports = self
            .flights
            .statistics
            .run(|| {
                fan_out(workers, |ep| async move {
                    let mut c = ep.client.clone();
                    c.model_statistics(pb::ModelStatisticsRequest::default())
                        .await
                })
            })
            .await;
        for (addr, r) in reports {
            if let Some(r) = r {
                self.stats.update(&addr, r.model_stats);
            }
        }
        let mut model_stats = self.stats.sum(&req.name, &req.version);
        if let Some(c) = &caller {
            model_stats.retain(|m| c.allows_model(&m.name));
        }
        if !req.name.is_empty() && model_stats.is_empty() {
            return Err(RequestError::NotFound(format!(
                "no statistics for model '{}'",
                clip(&req.name)
            ))
            .into());
        }
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    /// The union over workers; `reason` says which workers hold each version.
    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<pb::RepositoryIndexResponse> {
        let caller = auth::caller(&req);
        let ready_only = req.into_inner().ready;
        let workers = self.pool.all();
        let answers = self
            .flights
            .index
            .run(|| {
                fan_out(workers.clone(), |ep| async move {
                    let mut c = ep.client.clone();
                    c.repository_index(pb::RepositoryIndexRequest::default())
                        .await
                })
            })
            .await;
        let mut union: std::collections::BTreeMap<(String, String), (bool, Vec<String>)> =
            Default::default();
        for (addr, a) in answers {
            let Some(a) = a else { continue };
            for m in a.models {
                let e = union.entry((m.name, m.version)).or_default();
                let ready = m.state == "READY";
                e.0 |= ready;
                e.1.push(if ready {
                    addr.clone()
                } else {
                    format!("{} ({} {})", addr, m.state, m.reason)
                });
            }
        }
        let now_ms = infermesh_core::unix_ms() as i64;
        let internals = caller.as_ref().is_none_or(|c| c.sees_internals());
        let models = union
            .into_iter()
            .filter(|(_, (ready, _))| *ready || !ready_only)
            .filter(|((name, _), _)| caller.as_ref().is_none_or(|c| c.allows_model(name)))
            .filter_map(|((name, version), (ready, on))| {
                // Placed models: their copies, sizes and last use, as the workers' change
                // streams tell them (a model's not-loaded row dropped beside its copies).
                let placed = crate::placement::describe::row(&workers, &name, &version, now_ms);
                let reason = match (placed, internals) {
                    (Some(row), _) if row.is_empty() => return None,
                    (Some(row), true) => row,
                    (_, false) => match on.len() {
                        1 => "on 1 worker".to_string(),
                        n => format!("on {n} workers"),
                    },
                    (None, true) => format!("workers: {}", on.join(", ")),
                };
                Some(pb::repository_index_response::ModelIndex {
                    name,
                    version,
                    state: if ready { "READY" } else { "UNAVAILABLE" }.into(),
                    reason,
                })
            })
            .collect();
        let mut response = Response::new(pb::RepositoryIndexResponse { models });
        if caller.as_ref().is_none_or(|c| c.sees_internals()) {
            worker_states(&workers, response.metadata_mut());
        }
        Ok(response)
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<pb::RepositoryModelLoadResponse> {
        self.allow_control()?;
        let tenant = auth::caller(&req).map(|c| c.tenant().to_string());
        let req = req.into_inner();
        tracing::info!(model = %clip(&req.model_name), tenant = ?tenant, "model load asked");
        infermesh_core::model_control::check_name(&req.model_name)?;
        infermesh_core::model_control::check_load_parameters(req.parameters.keys())?;
        let workers = self.pool.all();
        let answers = join_all(workers.iter().map(|ep| {
            let req = req.clone();
            async move { ep.client.clone().repository_model_load(req).await }
        }))
        .await;
        // Load, then route: the pool learns what the workers now serve before the answer,
        // so the next request routes without waiting for a refresh.
        learn_now(&workers).await;
        answers.into_iter().find(|a| a.is_err()).transpose()?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<pb::RepositoryModelUnloadResponse> {
        self.allow_control()?;
        let tenant = auth::caller(&req).map(|c| c.tenant().to_string());
        let req = req.into_inner();
        tracing::info!(model = %clip(&req.model_name), tenant = ?tenant, "model unload asked");
        infermesh_core::model_control::check_name(&req.model_name)?;
        let workers = self.pool.all();
        let answers = join_all(workers.iter().map(|ep| {
            let req = req.clone();
            async move { ep.client.clone().repository_model_unload(req).await }
        }))
        .await;
        learn_now(&workers).await;
        answers.into_iter().find(|a| a.is_err()).transpose()?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    infermesh_core::unsupported_rpcs!();
}

impl GatewayService {
    /// A failure as the caller may see it: worker addresses and paths only for callers
    /// with `admin` (or with --verbose-errors) when auth is on.
    fn scrub(&self, caller: Option<&auth::Caller>, status: Status) -> Status {
        match caller {
            Some(c) if !c.sees_internals() => {
                let all = self.pool.all();
                let addrs: Vec<&str> = all.iter().map(|e| e.addr.as_str()).collect();
                c.scrub_status(status, &addrs)
            }
            _ => status,
        }
    }

    fn allow_control(&self) -> std::result::Result<(), Status> {
        if self.control == ControlMode::None {
            return Err(RequestError::FailedPrecondition(
                "model load/unload through the gateway is off (--model-control-mode none)".into(),
            )
            .into());
        }
        Ok(())
    }
}

/// Most workers listed in a RepositoryIndex answer's metadata (keeps the header small).
const MAX_LISTED_WORKERS: usize = 32;

/// Each worker's state as `infermesh-worker` metadata on a RepositoryIndex answer, for
/// `infermesh models`: a worker that is down lists no models, so the index alone cannot
/// show it. Other clients ignore unknown metadata.
fn worker_states(workers: &[Arc<Endpoint>], md: &mut tonic::metadata::MetadataMap) {
    for ep in workers.iter().take(MAX_LISTED_WORKERS) {
        let seen = ep.seen();
        let state = match (seen.ready, seen.problem) {
            (true, _) => format!(
                "{} ready{}",
                ep.addr,
                crate::placement::describe::memory(ep)
            ),
            (false, Some(p)) => format!("{} unready: {p}", ep.addr),
            (false, None) => format!("{} unready", ep.addr),
        };
        // Metadata values are visible ASCII; anything else would make the insert fail.
        let ascii: String = infermesh_core::text::prefix(&state, 300)
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
            .collect();
        if let Ok(v) = ascii.parse() {
            md.append("infermesh-worker", v);
        }
    }
    if workers.len() > MAX_LISTED_WORKERS {
        let more = format!("... {} more", workers.len() - MAX_LISTED_WORKERS);
        if let Ok(v) = more.parse() {
            md.append("infermesh-worker", v);
        }
    }
}
