//! A loaded model version: its served signature, its instances, and request validation.

mod validate;

use std::path::PathBuf;

use bytes::Bytes;
use infermesh_core::{tensor::decode_inputs, DataType, Tensor};
use infermesh_proto::{self as pb, model_infer_request::InferInputTensor};

use crate::{
    engine::{
        onnx::{DeviceRequest, OnnxEngine, SessionOptions},
        GraphSpec, IoSpec, Provider,
    },
    instance::{self, Queue},
    Error,
};

/// The signature a model serves, in Triton's terms: with `max_batch_size > 0` the dims
/// leave out the batch dim, which every request carries first.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    pub max_batch_size: usize,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
}

impl Signature {
    /// Triton's auto-complete: a graph whose every input and output starts with an open dim
    /// is batchable along it, up to `default_max_batch_size`.
    pub fn from_graph(graph: &GraphSpec, default_max_batch_size: usize) -> Self {
        let all = graph.inputs.iter().chain(&graph.outputs);
        let batchable =
            default_max_batch_size > 0 && all.clone().all(|io| io.dims.first() == Some(&-1));
        let strip = |ios: &[IoSpec]| {
            ios.iter()
                .map(|io| IoSpec {
                    dims: if batchable {
                        io.dims[1..].to_vec()
                    } else {
                        io.dims.clone()
                    },
                    ..io.clone()
                })
                .collect()
        };
        Self {
            max_batch_size: if batchable { default_max_batch_size } else { 0 },
            inputs: strip(&graph.inputs),
            outputs: strip(&graph.outputs),
        }
    }

    /// The shape clients see in ModelMetadata: -1 first for the batch dim.
    pub fn full_shape(&self, io: &IoSpec) -> Vec<i64> {
        if self.max_batch_size > 0 {
            std::iter::once(-1).chain(io.dims.iter().copied()).collect()
        } else {
            io.dims.clone()
        }
    }
}

/// How to load a model version.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub name: String,
    pub version: i64,
    pub path: PathBuf,
    pub instances: usize,
    pub device: DeviceRequest,
    pub intra_op_threads: usize,
    pub default_max_batch_size: usize,
    pub queue_capacity: usize,
}

pub struct Model {
    pub name: String,
    pub version: i64,
    pub signature: Signature,
    pub config: pb::ModelConfig,
    /// What each instance really runs on, in instance order.
    pub providers: Vec<Provider>,
    queue: Queue,
}

impl Model {
    /// Loads every instance (blocking: call from `spawn_blocking`), warm-up included.
    pub fn load(opts: &LoadOptions) -> Result<Model, Error> {
        let (queue, jobs) = Queue::bounded(opts.queue_capacity);
        let session = SessionOptions {
            device: opts.device,
            intra_op_threads: opts.intra_op_threads,
        };
        let mut graph = None;
        let mut providers = Vec::with_capacity(opts.instances);
        for i in 0..opts.instances.max(1) {
            let (path, session) = (opts.path.clone(), session.clone());
            let label = format!("{}-{}-{i}", opts.name, opts.version);
            let (spec, provider) = instance::spawn(
                label,
                move || OnnxEngine::load(&path, &session),
                jobs.clone(),
            )?;
            graph.get_or_insert(spec);
            providers.push(provider);
        }
        let graph = graph.expect("at least one instance");
        let signature = Signature::from_graph(&graph, opts.default_max_batch_size);
        let config = derived_config(opts, &signature, &providers);
        Ok(Model {
            name: opts.name.clone(),
            version: opts.version,
            signature,
            config,
            providers,
            queue,
        })
    }

    /// Validates the request against the signature, decodes its tensors and runs it on
    /// some instance.
    pub async fn infer(
        &self,
        inputs: &[InferInputTensor],
        raw: &[Bytes],
        outputs: &[String],
    ) -> Result<Vec<Tensor>, Error> {
        validate::inputs(&self.name, &self.signature, inputs)?;
        let outputs = validate::outputs(&self.name, &self.signature, outputs)?;
        let inputs = decode_inputs(inputs, raw)?;
        self.queue.submit(&self.name, inputs, outputs).await
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

/// The configuration Triton's auto-complete would derive from the graph.
fn derived_config(opts: &LoadOptions, sig: &Signature, providers: &[Provider]) -> pb::ModelConfig {
    let kind = match providers.first() {
        Some(Provider::Cuda(_)) => pb::model_instance_group::Kind::Gpu,
        _ => pb::model_instance_group::Kind::Cpu,
    };
    let gpus = providers
        .iter()
        .filter_map(|p| match p {
            Provider::Cuda(d) => Some(*d),
            Provider::Cpu => None,
        })
        .collect();
    pb::ModelConfig {
        name: opts.name.clone(),
        platform: "onnxruntime_onnx".into(),
        backend: "onnxruntime".into(),
        max_batch_size: sig.max_batch_size as i32,
        input: sig
            .inputs
            .iter()
            .map(|io| pb::ModelInput {
                name: io.name.clone(),
                data_type: DataType::to_config(io.datatype) as i32,
                dims: io.dims.clone(),
                ..Default::default()
            })
            .collect(),
        output: sig
            .outputs
            .iter()
            .map(|io| pb::ModelOutput {
                name: io.name.clone(),
                data_type: DataType::to_config(io.datatype) as i32,
                dims: io.dims.clone(),
                ..Default::default()
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: opts.name.clone(),
            count: providers.len() as i32,
            kind: kind as i32,
            gpus,
            ..Default::default()
        }],
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::Latest(
                pb::model_version_policy::Latest { num_versions: 1 },
            )),
        }),
        ..Default::default()
    }
}
