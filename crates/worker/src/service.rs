//! `inference.GRPCInferenceService` for the worker.

use std::{sync::Arc, time::Instant};

use infermesh_core::{admission::ByteBudget, auth, frame, metrics, trace, Lifecycle};
use infermesh_proto::{self as pb, grpc_inference_service_server::GrpcInferenceService};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    cache::{self, key, ResponseCache},
    classify,
    control::Control,
    metrics::{ModelLabels, WorkerMetrics},
    model::Model,
    model_config::Caching,
    repository::Repository,
    Error,
};

/// Messages of one stream in flight at once (then the stream stops reading).
const MAX_STREAM_IN_FLIGHT: usize = 256;

/// Protocol extensions this server implements, as ServerMetadata lists them. Only what is
/// implemented: perf_analyzer changes its behaviour by this list.
const EXTENSIONS: &[&str] = &[
    "classification",
    "model_configuration",
    "model_repository",
    "sequence",
    "statistics",
];

#[derive(Clone)]
pub struct WorkerService {
    pub repo: Arc<Repository>,
    pub control: Arc<Control>,
    pub lifecycle: Lifecycle,
    /// Set once every model found at start has finished loading (ready or failed).
    /// Bytes of requests held in memory, process-wide.
    pub budget: ByteBudget,
    pub metrics: WorkerMetrics,
    /// The response cache (`--cache-config`), for models whose config turns it on.
    pub cache: Option<Arc<ResponseCache>>,
}

/// Adds to a gauge for as long as it lives; dropped futures (cancelled calls) still undo it.
struct GaugeGuard(Gauge, i64);

impl GaugeGuard {
    fn new(g: &Gauge, n: i64) -> Self {
        g.inc_by(n);
        Self(g.clone(), n)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec_by(self.1);
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

impl WorkerService {
    /// Runs one inference request; shared by ModelInfer and each message of a stream.
    /// Admission is checked by the caller: a stream opened before shutdown keeps being
    /// served while it drains. `deadline` comes from the call's `grpc-timeout`; `caller`
    /// is who this worker authenticated, if it did.
    pub async fn infer(
        &self,
        req: pb::ModelInferRequest,
        deadline: Option<Instant>,
        caller: Option<&auth::Caller>,
    ) -> std::result::Result<pb::ModelInferResponse, Error> {
        let tenant = caller.map(auth::Caller::tenant);
        let model = metrics::model_label(&req.model_name, self.repo.knows(&req.model_name));
        let _inflight = GaugeGuard::new(&self.metrics.inflight_requests, 1);
        let mut record = metrics::RequestRecord::new(|code, version, took| {
            self.metrics.record_request(&model, version, code, took)
        });
        let result = self.run(req, deadline, tenant).await;
        match &result {
            Ok(r) => record.finish(tonic::Code::Ok, &r.model_version),
            Err(e) => record.finish(Status::from(e.clone()).code(), ""),
        }
        if let Err(e) = &result {
            let status = Status::from(e.clone());
            tracing::debug!(trace_id = %trace::trace_id(), code = ?status.code(), message = status.message(), "request failed");
            trace::finish(&trace::current(), Some(&status));
        } else {
            trace::finish(&trace::current(), None);
        }
        result
    }

    /// `infer` without the bookkeeping. `deadline` already holds Triton's `timeout`
    /// parameter (the handler frame's).
    async fn run(
        &self,
        req: pb::ModelInferRequest,
        deadline: Option<Instant>,
        tenant: Option<&str>,
    ) -> std::result::Result<pb::ModelInferResponse, Error> {
        let started = Instant::now();
        let size = req.encoded_len();
        let _held = self.budget.acquire(size)?;
        let _bytes = GaugeGuard::new(&self.metrics.inflight_bytes, size as i64);
        let model = self.repo.get(&req.model_name, &req.model_version)?;
        let _in_use = model.usage.begin();
        let cached = self.cache.as_ref().and_then(|cache| {
            let scope = match model.caching {
                Caching::Off => return None,
                Caching::Shared => key::Scope::default(),
                Caching::PerTenant => key::Scope::of(tenant, &req),
            };
            let version = key::Version {
                name: &model.name,
                version: model.version,
                generation: model.generation,
            };
            Some((cache, key::of(&req, &version, scope)))
        });
        if let Some((cache, key)) = &cached {
            if let Some(hit) = cache.get(key) {
                return self.answer_hit(&model, &hit, req.id, deadline, started);
            }
        }
        let lookup = started.elapsed();
        let asked: Vec<String> = req.outputs.iter().map(|o| o.name.clone()).collect();
        let classes = classify::asked(&req.outputs)?;
        let mut outputs = model
            .infer(
                &req.inputs,
                &req.raw_input_contents,
                &asked,
                &req.parameters,
                deadline,
            )
            .await?;
        if !classes.is_empty() {
            let batched = model.signature.max_batch_size > 0;
            for t in &mut outputs {
                if let Some(&n) = classes.get(&t.name) {
                    let labels = model.labels.get(&t.name).map(Vec::as_slice);
                    *t = classify::classify(t, n, batched, labels)?;
                }
            }
        }
        let _response = infermesh_core::child_span!("response").entered();
        let resp = pb::ModelInferResponse {
            model_name: model.name.clone(),
            model_version: model.version.to_string(),
            id: req.id,
            parameters: Default::default(),
            raw_output_contents: outputs.iter().map(|t| t.to_raw()).collect(),
            outputs: outputs
                .into_iter()
                .map(|t| pb::model_infer_response::InferOutputTensor {
                    name: t.name,
                    datatype: t.datatype.as_str().into(),
                    shape: t.shape,
                    ..Default::default()
                })
                .collect(),
        };
        if let Some((cache, key)) = &cached {
            let stored = Instant::now();
            cache.put(key, &model.name, cache::Answer::of(&resp));
            model.stats.cache_miss(lookup + stored.elapsed());
            self.cache_series(&model).1.inc();
        }
        Ok(resp)
    }

    /// A cached answer, unless the request's deadline has passed: a hit honours it as the
    /// engine would.
    fn answer_hit(
        &self,
        model: &Model,
        hit: &cache::Answer,
        id: String,
        deadline: Option<Instant>,
        started: Instant,
    ) -> std::result::Result<pb::ModelInferResponse, Error> {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            model.stats.skipped_expired(started.elapsed());
            return Err(infermesh_core::Error::DeadlineExceeded(format!(
                "model '{}': the request's deadline passed before its cached answer was sent",
                model.name
            ))
            .into());
        }
        model.stats.cache_hit(started.elapsed());
        self.cache_series(model).0.inc();
        Ok(hit.response(&model.name, model.version, id))
    }

    /// The model's (hits, misses) series, looked up once.
    fn cache_series<'m>(&self, model: &'m Model) -> &'m (Counter, Counter) {
        model.cache_series.get_or_init(|| {
            let labels = ModelLabels {
                model: model.name.clone(),
                version: model.version.to_string(),
            };
            let m = &self.metrics.cache;
            (
                m.hits.get_or_create(&labels).clone(),
                m.misses.get_or_create(&labels).clone(),
            )
        })
    }

    /// Ready once every model found at start has finished loading and the repository
    /// can serve something.
    fn is_ready(&self) -> bool {
        !self.lifecycle.is_draining() && self.control.can_serve()
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for WorkerService {
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
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<pb::ModelReadyResponse> {
        auth::check_model(&req, &req.get_ref().name)?;
        let req = req.into_inner();
        let ready = self.repo.get(&req.name, &req.version).is_ok() && !self.lifecycle.is_draining();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<pb::ServerMetadataResponse> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "infermesh".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<pb::ModelMetadataResponse> {
        auth::check_model(&req, &req.get_ref().name)?;
        let req = req.into_inner();
        let model = self
            .repo
            .get(&req.name, &req.version)
            .map_err(Status::from)?;
        Ok(Response::new(model.metadata()))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<pb::ModelConfigResponse> {
        auth::check_model(&req, &req.get_ref().name)?;
        let req = req.into_inner();
        let model = self
            .repo
            .get(&req.name, &req.version)
            .map_err(Status::from)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model.config.clone()),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<pb::ModelInferResponse> {
        frame::unary(req, &self.lifecycle, &self.budget, |call| async move {
            self.infer(call.req, call.deadline, call.caller.as_ref())
                .await
                .map_err(Status::from)
        })
        .await
    }

    type ModelStreamInferStream = infermesh_core::stream::ResponseStream;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Self::ModelStreamInferStream> {
        let svc = self.clone();
        // A stream's grpc-timeout bounds the stream; each message may carry `timeout`.
        let opts = frame::StreamFrame {
            max_in_flight: MAX_STREAM_IN_FLIGHT,
            mesh_parameters: true,
            replies: self.budget.clone(),
        };
        frame::stream(req, &self.lifecycle, opts, move |call| {
            let svc = svc.clone();
            async move {
                svc.infer(call.req, call.deadline, call.caller.as_ref())
                    .await
                    .map_err(Status::from)
            }
        })
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
        let models = if req.name.is_empty() {
            self.repo.ready_models()
        } else if req.version.is_empty() {
            // Every ready version of the model, as Triton does.
            self.repo.get(&req.name, "").map_err(Status::from)?;
            let all = self.repo.ready_models();
            all.into_iter().filter(|m| m.name == req.name).collect()
        } else {
            vec![self
                .repo
                .get(&req.name, &req.version)
                .map_err(Status::from)?]
        };
        Ok(Response::new(pb::ModelStatisticsResponse {
            model_stats: models
                .iter()
                .filter(|m| caller.as_ref().is_none_or(|c| c.allows_model(&m.name)))
                .map(|m| m.stats.to_pb(&m.name, m.version))
                .collect(),
        }))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<pb::RepositoryIndexResponse> {
        let caller = auth::caller(&req);
        let mut models = self.repo.index();
        if req.into_inner().ready {
            models.retain(|m| m.state == "READY");
        }
        if let Some(c) = &caller {
            models.retain(|m| c.allows_model(&m.name));
            // Load failures name files: only for callers who may see them.
            for m in &mut models {
                m.reason = c.scrub(&m.reason, &[]);
            }
        }
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<pb::RepositoryModelLoadResponse> {
        let req = req.into_inner();
        infermesh_core::model_control::check_load_parameters(req.parameters.keys())?;
        let pin = crate::control::pin_parameter(&req.parameters)?;
        let name = req.model_name;
        self.control.load(&name).await.map_err(|e| match e {
            Error::Load(reason) => {
                Status::invalid_argument(format!("failed to load '{name}': {reason}"))
            }
            other => Status::from(other),
        })?;
        if let Some(pin) = pin {
            self.control.set_pinned(&name, pin)?;
        }
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<pb::RepositoryModelUnloadResponse> {
        self.control.unload(&req.into_inner().model_name).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    infermesh_core::unsupported_rpcs!();
}
