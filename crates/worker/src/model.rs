//! A loaded model version: its configuration and served signature, its instances, its
//! scheduler and statistics.

pub mod validate;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use infermesh_core::{tensor::decode_inputs, Tensor};
use infermesh_proto::{self as pb, model_infer_request::InferInputTensor};
use prometheus_client::metrics::counter::Counter;

use crate::{
    engine::{
        identity::IdentityEngine,
        onnx::{DeviceRequest, OnnxEngine, SessionOptions},
        IoSpec, Provider,
    },
    instance,
    metrics::{InstanceLabels, WorkerMetrics},
    model_config::{self, Backend, BatchPolicy},
    scheduler::Scheduler,
    stats::Stats,
    Error,
};

/// The signature a model serves, in Triton's terms: with `max_batch_size > 0` the dims
/// leave out the batch dim, which every request carries first.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    pub max_batch_size: usize,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// BYTES inputs are text for the engine (ONNX string tensors): UTF-8, no NUL.
    pub text_strings: bool,
}

impl Signature {
    /// The shape clients see in ModelMetadata: -1 first for the batch dim.
    pub fn full_shape(&self, io: &IoSpec) -> Vec<i64> {
        if self.max_batch_size > 0 {
            std::iter::once(-1).chain(io.dims.iter().copied()).collect()
        } else {
            io.dims.clone()
        }
    }
}

/// Worker-wide defaults for loading models.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub device: DeviceRequest,
    pub intra_op_threads: usize,
    pub intra_op_spinning: bool,
    pub default_max_batch_size: usize,
    pub queue_capacity: usize,
    /// `--default-queue-timeout`, for requests and configs that set no deadline.
    pub queue_timeout: Option<Duration>,
    pub metrics: WorkerMetrics,
    /// The worker has a response cache (`--cache-config`).
    pub cache: bool,
    /// The worker's byte budget, which sequences' state counts against.
    pub budget: infermesh_core::admission::ByteBudget,
    /// `--max-sequence-slots`: sequence slots per stateful model at most.
    pub max_sequence_slots: usize,
}

/// One model version to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub name: String,
    pub version: i64,
    pub path: PathBuf,
    /// The parsed config.pbtxt, if the model has one.
    pub config: Option<pb::ModelConfig>,
    pub defaults: Defaults,
    /// The version's statistics from earlier loads, to go on accumulating (ModelStatistics
    /// never goes backwards across an unload and a load).
    pub stats: Option<Arc<Stats>>,
}

pub struct Model {
    pub name: String,
    pub version: i64,
    pub signature: Signature,
    pub config: pb::ModelConfig,
    pub batching: Option<BatchPolicy>,
    /// What each instance really runs on, in instance order.
    pub providers: Vec<Provider>,
    pub stats: Arc<Stats>,
    /// This load of the version, unique in the process: a reload of the same version is
    /// another generation, so no cached answer outlives the weights that gave it.
    pub generation: u64,
    /// Whether, and with whom, answers are cached.
    pub caching: model_config::Caching,
    /// Requests in flight and the last use, for placement's eviction.
    pub usage: crate::placement::Usage,
    /// Alive while any of its instance threads (and so its engines) is.
    pub alive: std::sync::Weak<()>,
    /// Each output's labels (`label_filename`), for the classification extension.
    pub labels: std::collections::HashMap<String, Vec<String>>,
    /// Its `infermesh_cache_hits_total`/`_misses_total` series, resolved at its first
    /// cached request (no series for a model that never caches).
    pub cache_series: std::sync::OnceLock<(Counter, Counter)>,
    /// A stateful model's sequences (`sequence_batching`).
    pub sequences: Option<crate::sequence::Sequences>,
    scheduler: Scheduler,
    queue_timeout: Option<Duration>,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Model {
    /// Loads every instance, warm-up included. Blocking: call from `spawn_blocking` (inside
    /// a tokio runtime, which the scheduler task needs).
    pub fn load(opts: &LoadOptions) -> Result<Model, Error> {
        let given = opts.config.is_some();
        let config = opts.config.clone().unwrap_or_default();
        let backend = model_config::backend(&config)?;
        let devices = model_config::instances(&config, opts.defaults.device)?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let stats = opts.stats.clone().unwrap_or_else(|| {
            Arc::new(Stats::new(
                opts.defaults.metrics.model(&opts.name, opts.version),
            ))
        });
        // The model directory (the version's parent) holds warmup/ files.
        let model_dir = opts.path.parent().unwrap_or(&opts.path);
        let samples = Arc::new(crate::warmup::samples(&config, model_dir)?);
        let mut graph = None;
        let mut providers = Vec::with_capacity(devices.len());
        // Held by the instance threads only: gone once all have ended.
        let alive = Arc::new(());
        for (i, device) in devices.iter().enumerate() {
            let label = format!("{}-{}-{i}", opts.name, opts.version);
            let (jobs, stats) = (jobs_rx.clone(), stats.clone());
            let (spec, provider) = match backend {
                Backend::Onnx => {
                    let path = opts.path.join("model.onnx");
                    let session = SessionOptions {
                        device: *device,
                        intra_op_threads: opts.defaults.intra_op_threads,
                        spinning: opts.defaults.intra_op_spinning,
                    };
                    instance::spawn(
                        label,
                        move || OnnxEngine::load(&path, &session),
                        samples.clone(),
                        jobs,
                        stats,
                        alive.clone(),
                    )?
                }
                Backend::Identity => {
                    let spec = model_config::identity_graph(&config)?;
                    let engine = IdentityEngine::new(&config)?;
                    let samples = samples.clone();
                    instance::spawn(
                        label,
                        move || Ok((engine, spec)),
                        samples,
                        jobs,
                        stats,
                        alive.clone(),
                    )?
                }
            };
            graph.get_or_insert(spec);
            providers.push(provider);
        }
        let graph = graph.ok_or_else(|| Error::Load("instance_group: no instances".into()))?;
        for (i, p) in providers.iter().enumerate() {
            let labels = InstanceLabels {
                model: opts.name.clone(),
                version: opts.version.to_string(),
                instance: i.to_string(),
                provider: p.to_string(),
            };
            opts.defaults
                .metrics
                .instance_provider
                .get_or_create(&labels)
                .set(1);
        }
        let mut config = model_config::complete(
            config,
            &opts.name,
            &graph,
            given,
            opts.defaults.default_max_batch_size,
        )?;
        if config.instance_group.is_empty() {
            config.instance_group = vec![reported_group(&opts.name, &providers)];
        }
        let caching = model_config::caching(&config)?;
        if caching != model_config::Caching::Off && !opts.defaults.cache {
            tracing::warn!(model = %opts.name, version = opts.version, "response_cache is enabled but the worker has no --cache-config: answers are not cached");
        }
        let caching = match opts.defaults.cache {
            true => caching,
            false => model_config::Caching::Off,
        };
        let labels = labels(&config, model_dir)?;
        let signature = model_config::signature(&config);
        let capacity = model_config::queue_capacity(&config, opts.defaults.queue_capacity);
        let sequences = crate::sequence::Policy::of(
            &config,
            &graph,
            providers.len(),
            opts.defaults.max_sequence_slots,
            model_dir,
        )?
        .map(|policy| {
            crate::sequence::Sequences::new(
                &opts.name,
                opts.version,
                policy,
                capacity,
                opts.defaults.budget.clone(),
                &opts.defaults.metrics.sequences,
            )
        });
        let batching = match &sequences {
            Some(s) => s.policy().batch.clone(),
            None => model_config::batch_policy(&config),
        };
        let scheduler = Scheduler::start(
            opts.name.clone(),
            batching.clone(),
            capacity,
            providers.len(),
            jobs_tx,
            stats.clone(),
        );
        Ok(Model {
            name: opts.name.clone(),
            version: opts.version,
            signature,
            config,
            batching,
            providers,
            stats,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            caching,
            usage: Default::default(),
            alive: Arc::downgrade(&alive),
            labels,
            cache_series: Default::default(),
            sequences,
            scheduler,
            queue_timeout: opts.defaults.queue_timeout,
        })
    }

    /// Validates the request against the signature, decodes its tensors and runs it.
    /// `deadline` is the caller's; the config's default queue timeout applies when the
    /// request has none (or may not override it).
    pub async fn infer(
        &self,
        inputs: &[InferInputTensor],
        raw: &[Bytes],
        outputs: &[String],
        parameters: &infermesh_core::raw::Parameters,
        deadline: Option<Instant>,
    ) -> Result<Vec<Tensor>, Error> {
        let rows = validate::inputs(&self.name, &self.signature, inputs)?;
        let outputs = validate::outputs(&self.name, &self.signature, outputs)?;
        let inputs = decode_inputs(inputs, raw)?;
        validate::strings(&self.signature, &inputs)?;
        let deadline = match self
            .batching
            .as_ref()
            .and_then(|b| b.default_timeout.map(|t| (t, b.allow_timeout_override)))
        {
            Some((t, allow)) if deadline.is_none() || !allow => Instant::now().checked_add(t),
            _ => deadline,
        };
        let deadline = deadline.or_else(|| {
            self.queue_timeout
                .and_then(|t| Instant::now().checked_add(t))
        });
        let Some(sequences) = &self.sequences else {
            return self.scheduler.submit(inputs, outputs, rows, deadline).await;
        };
        let seq = infermesh_core::sequence::of(parameters)?;
        sequences
            .run(seq, rows, deadline, inputs, outputs, |inputs, outputs| {
                self.scheduler.submit(inputs, outputs, rows, deadline)
            })
            .await
    }

    pub fn metadata(&self) -> pb::ModelMetadataResponse {
        let meta = |io: &IoSpec| pb::model_metadata_response::TensorMetadata {
            name: io.name.clone(),
            datatype: io.datatype.as_str().to_string(),
            shape: self.signature.full_shape(io),
        };
        pb::ModelMetadataResponse {
            name: self.name.clone(),
            versions: vec![self.version.to_string()],
            platform: self.config.platform.clone(),
            inputs: self.signature.inputs.iter().map(meta).collect(),
            outputs: self.signature.outputs.iter().map(meta).collect(),
        }
    }
}

/// The instance_group a config without one is reported with: what really runs.
fn reported_group(name: &str, providers: &[Provider]) -> pb::ModelInstanceGroup {
    let gpus: Vec<i32> = providers
        .iter()
        .filter_map(|p| match p {
            Provider::Cuda(d) => Some(*d),
            Provider::Cpu => None,
        })
        .collect();
    let kind = if gpus.is_empty() {
        pb::model_instance_group::Kind::Cpu
    } else {
        pb::model_instance_group::Kind::Gpu
    };
    pb::ModelInstanceGroup {
        name: name.to_string(),
        count: providers.len() as i32,
        kind: kind as i32,
        gpus,
        ..Default::default()
    }
}

/// The labels each output's `label_filename` names: a file in the model's directory, one
/// label a line (the classification extension appends them).
fn labels(
    config: &pb::ModelConfig,
    model_dir: &std::path::Path,
) -> Result<std::collections::HashMap<String, Vec<String>>, Error> {
    let mut out = std::collections::HashMap::new();
    for o in config
        .output
        .iter()
        .filter(|o| !o.label_filename.is_empty())
    {
        let file = &o.label_filename;
        let plain = std::path::Path::new(file)
            .file_name()
            .is_some_and(|n| n == std::ffi::OsStr::new(file));
        if !plain || file == ".." {
            return Err(Error::Load(format!(
                "output '{}' label_filename '{file}': expected a file name in the model's directory",
                o.name
            )));
        }
        let text = std::fs::read_to_string(model_dir.join(file)).map_err(|e| {
            Error::Load(format!(
                "output '{}' label_filename '{file}': cannot read it: {e}",
                o.name
            ))
        })?;
        out.insert(o.name.clone(), text.lines().map(str::to_string).collect());
    }
    Ok(out)
}
