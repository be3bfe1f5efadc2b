//! `config.pbtxt`: Triton's model configuration in protobuf text format, parsed against our
//! own schema with prost-reflect, then auto-completed from the graph and checked against
//! it the way Triton does. Where config and graph disagree the load fails naming the field.

use std::{path::Path, sync::OnceLock, time::Duration};

use infermesh_core::DataType;
use infermesh_proto::{self as pb, model_instance_group::Kind};
use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::{
    engine::{onnx::DeviceRequest, GraphSpec, IoSpec},
    model::Signature,
    Error,
};

/// Reads `<model_dir>/config.pbtxt` if there is one.
pub fn read(model_dir: &Path) -> Result<Option<pb::ModelConfig>, Error> {
    let path = model_dir.join("config.pbtxt");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Load(format!("cannot read {}: {e}", path.display()))),
    };
    let config = parse(&text).map_err(|e| Error::Load(format!("{}: {e}", path.display())))?;
    // Every field is honoured, warned about once per load, or refused by name.
    let warnings =
        fields::check(&config).map_err(|e| Error::Load(format!("{}: {e}", path.display())))?;
    for w in warnings {
        tracing::warn!(config = %path.display(), "{w}");
    }
    Ok(Some(config))
}

/// Parses protobuf text format into a ModelConfig.
pub fn parse(text: &str) -> Result<pb::ModelConfig, String> {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        DescriptorPool::decode(infermesh_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set compiled into the binary")
    });
    let desc = pool
        .get_message_by_name("inference.ModelConfig")
        .expect("ModelConfig in the descriptor set");
    let (fixed, inserted) = colon_before_lists(text);
    let msg = DynamicMessage::parse_text_format(desc, &fixed).map_err(|e| {
        use miette::Diagnostic as _;
        let at = e.labels().and_then(|mut l| l.next()).map(|l| l.offset());
        match at {
            // Offsets are in the text with the added colons; count back to the file's.
            Some(at) => {
                let at = at - inserted.iter().filter(|&&i| i < at).count();
                let (line, column) = line_column(text, at);
                format!("line {line}, column {column}: {e}")
            }
            None => e.to_string(),
        }
    })?;
    msg.transcode_to().map_err(|e| e.to_string())
}

/// 1-based line and column (in characters) of byte offset `at` of `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = infermesh_core::text::prefix(text, at);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Protobuf text format lets the colon before a list of messages go (`input [ { ... } ]`),
/// and Triton's configs nearly always leave it out; prost-reflect's parser wants it. Adds
/// it after a field name that a `[` follows, outside strings and comments. Returns the
/// text and the offsets (in it) of the colons added, so errors can point into the file.
fn colon_before_lists(text: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        out.extend(chars.next());
                    } else if d == c {
                        break;
                    }
                }
            }
            '#' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '[' => {
                let trimmed = out.trim_end();
                let word = trimmed
                    .rsplit(|p: char| !(p.is_ascii_alphanumeric() || p == '_'))
                    .next()
                    .unwrap_or("");
                if word.starts_with(|f: char| f.is_ascii_alphabetic() || f == '_') {
                    // Right after the name, keeping the white space (and so the lines).
                    let at = trimmed.len();
                    out.insert(at, ':');
                    inserted.push(at);
                }
                out.push('[');
            }
            _ => out.push(c),
        }
    }
    (out, inserted)
}

/// Which engine runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Onnx,
    /// Outputs = inputs (output i echoes input i), for tests and measuring the mesh.
    Identity,
}

pub fn backend(config: &pb::ModelConfig) -> Result<Backend, Error> {
    match (config.backend.as_str(), config.platform.as_str()) {
        ("identity", _) => Ok(Backend::Identity),
        ("" | "onnxruntime", "" | "onnxruntime_onnx") => Ok(Backend::Onnx),
        (b, p) => Err(Error::Load(format!(
            "backend '{b}' / platform '{p}' is not served; use backend \"onnxruntime\" (platform \"onnxruntime_onnx\") or \"identity\""
        ))),
    }
}

/// The devices of every instance, in order (instance_group; default one instance of
/// `default_kind`).
pub fn instances(
    config: &pb::ModelConfig,
    default_kind: DeviceRequest,
) -> Result<Vec<DeviceRequest>, Error> {
    if config.instance_group.is_empty() {
        return Ok(vec![default_kind]);
    }
    let mut out = Vec::new();
    for (g, group) in config.instance_group.iter().enumerate() {
        let count = if group.count <= 0 {
            1
        } else {
            group.count as usize
        };
        let kind = Kind::try_from(group.kind).map_err(|_| {
            Error::Load(format!(
                "instance_group[{g}].kind: unknown value {}",
                group.kind
            ))
        })?;
        let gpus: Vec<i32> = if group.gpus.is_empty() {
            vec![0]
        } else {
            group.gpus.clone()
        };
        match kind {
            Kind::Cpu | Kind::Model => out.extend(std::iter::repeat_n(DeviceRequest::Cpu, count)),
            // Triton puts `count` instances on each listed GPU.
            Kind::Gpu => gpus
                .iter()
                .for_each(|&d| out.extend(std::iter::repeat_n(DeviceRequest::Gpu(d), count))),
            Kind::Auto => gpus
                .iter()
                .for_each(|&d| out.extend(std::iter::repeat_n(DeviceRequest::Auto(d), count))),
        }
    }
    Ok(out)
}

/// Batching settings from `dynamic_batching`; `None` runs each request alone.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    /// Sorted ascending, each ≤ max_batch_size.
    pub preferred: Vec<usize>,
    pub max_queue_delay: Duration,
    pub default_timeout: Option<Duration>,
    pub allow_timeout_override: bool,
}

pub fn batch_policy(config: &pb::ModelConfig) -> Option<BatchPolicy> {
    let Some(pb::model_config::SchedulingChoice::DynamicBatching(db)) = &config.scheduling_choice
    else {
        return None;
    };
    if config.max_batch_size <= 0 {
        return None;
    }
    let max = config.max_batch_size as usize;
    let mut preferred: Vec<usize> = db
        .preferred_batch_size
        .iter()
        .filter(|&&p| p > 0 && p as usize <= max)
        .map(|&p| p as usize)
        .collect();
    preferred.sort_unstable();
    preferred.dedup();
    let policy = db.default_queue_policy.as_ref();
    Some(BatchPolicy {
        max_batch_size: max,
        preferred,
        max_queue_delay: Duration::from_micros(db.max_queue_delay_microseconds),
        default_timeout: policy
            .map(|p| p.default_timeout_microseconds)
            .filter(|&t| t > 0)
            .map(Duration::from_micros),
        allow_timeout_override: policy.is_none_or(|p| p.allow_timeout_override),
    })
}

/// The queue bound: dynamic_batching.default_queue_policy.max_queue_size, else the flag.
pub fn queue_capacity(config: &pb::ModelConfig, default: usize) -> usize {
    match &config.scheduling_choice {
        Some(pb::model_config::SchedulingChoice::DynamicBatching(db)) => db
            .default_queue_policy
            .as_ref()
            .map(|p| p.max_queue_size as usize)
            .filter(|&n| n > 0)
            .unwrap_or(default),
        _ => default,
    }
}

/// Fills in what the config leaves out from the graph (Triton's auto-complete) and checks
/// the rest against it. `given` says whether a config.pbtxt existed.
pub fn complete(
    mut config: pb::ModelConfig,
    name: &str,
    graph: &GraphSpec,
    given: bool,
    default_max_batch_size: usize,
) -> Result<pb::ModelConfig, Error> {
    if !config.name.is_empty() && config.name != name {
        return Err(Error::Load(format!(
            "config.pbtxt name '{}' differs from the model directory '{name}'",
            config.name
        )));
    }
    config.name = name.to_string();
    let batchable = graph
        .inputs
        .iter()
        .chain(&graph.outputs)
        .all(|io| io.dims.first() == Some(&-1));
    if !given && batchable && default_max_batch_size > 0 {
        config.max_batch_size = default_max_batch_size as i32;
        // Triton's auto-complete turns dynamic batching on for batchable models too.
        config.scheduling_choice = Some(pb::model_config::SchedulingChoice::DynamicBatching(
            Default::default(),
        ));
    }
    if config.max_batch_size < 0 {
        return Err(Error::Load(format!(
            "max_batch_size: {} is negative",
            config.max_batch_size
        )));
    }
    let batch = config.max_batch_size > 0;
    if batch && !batchable {
        let fixed = graph
            .inputs
            .iter()
            .chain(&graph.outputs)
            .find(|io| io.dims.first() != Some(&-1));
        return Err(Error::Load(format!(
            "max_batch_size: {} needs a variable first dim on every input and output, but the graph's '{}' has dims {:?}",
            config.max_batch_size,
            fixed.map(|io| io.name.as_str()).unwrap_or("?"),
            fixed.map(|io| io.dims.clone()).unwrap_or_default()
        )));
    }
    // A stateful model's control and state inputs (and state outputs) are the worker's
    // to fill and keep: clients neither send nor see them.
    let hidden_in = crate::sequence::Policy::hidden_inputs(&config);
    let hidden_out = crate::sequence::Policy::hidden_outputs(&config);
    if let Some((i, input)) = config
        .input
        .iter()
        .enumerate()
        .find(|(_, i)| hidden_in.contains(&i.name))
    {
        return Err(Error::Load(format!(
            "input[{i}] '{}': sequence_batching names it as a control or state input, which the worker fills; leave it out of input",
            input.name
        )));
    }
    let strip = |io: &IoSpec| {
        if batch {
            io.dims[1..].to_vec()
        } else {
            io.dims.clone()
        }
    };
    if config.input.is_empty() {
        config.input = graph
            .inputs
            .iter()
            .filter(|io| !hidden_in.contains(&io.name))
            .map(|io| pb::ModelInput {
                name: io.name.clone(),
                data_type: io.datatype.to_config() as i32,
                dims: strip(io),
                ..Default::default()
            })
            .collect();
    }
    if config.output.is_empty() {
        config.output = graph
            .outputs
            .iter()
            .filter(|io| !hidden_out.contains(&io.name))
            .map(|io| pb::ModelOutput {
                name: io.name.clone(),
                data_type: io.datatype.to_config() as i32,
                dims: strip(io),
                ..Default::default()
            })
            .collect();
    }
    for (i, input) in config.input.iter().enumerate() {
        let field = format!("input[{i}] '{}'", input.name);
        let io = graph
            .inputs
            .iter()
            .find(|io| io.name == input.name)
            .ok_or_else(|| {
                Error::Load(format!(
                    "{field}: the graph has no such input (it has: {})",
                    names(&graph.inputs)
                ))
            })?;
        check_io(
            &field,
            input.data_type,
            &input.dims,
            input.reshape.as_ref(),
            io,
            batch,
        )?;
    }
    for (i, output) in config.output.iter().enumerate() {
        let field = format!("output[{i}] '{}'", output.name);
        let io = graph
            .outputs
            .iter()
            .find(|io| io.name == output.name)
            .ok_or_else(|| {
                Error::Load(format!(
                    "{field}: the graph has no such output (it has: {})",
                    names(&graph.outputs)
                ))
            })?;
        check_io(
            &field,
            output.data_type,
            &output.dims,
            output.reshape.as_ref(),
            io,
            batch,
        )?;
    }
    if let Some(missing) = graph
        .inputs
        .iter()
        .find(|io| !hidden_in.contains(&io.name) && !config.input.iter().any(|i| i.name == io.name))
    {
        return Err(Error::Load(format!(
            "input: the graph's input '{}' is not in config.pbtxt",
            missing.name
        )));
    }
    if config.platform.is_empty() && config.backend != "identity" {
        config.platform = "onnxruntime_onnx".into();
    }
    if config.backend.is_empty() {
        config.backend = "onnxruntime".into();
    }
    if config.version_policy.is_none() {
        config.version_policy = Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::Latest(
                pb::model_version_policy::Latest { num_versions: 1 },
            )),
        });
    }
    Ok(config)
}

fn names(ios: &[IoSpec]) -> String {
    ios.iter()
        .map(|io| io.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_io(
    field: &str,
    data_type: i32,
    dims: &[i64],
    reshape: Option<&pb::ModelTensorReshape>,
    io: &IoSpec,
    batch: bool,
) -> Result<(), Error> {
    let dt = DataType::from_config_value(data_type)
        .ok_or_else(|| Error::Load(format!("{field}: data_type is missing or invalid")))?;
    if dt != io.datatype {
        return Err(Error::Load(format!(
            "{field}: data_type {} but the graph says {}",
            dt.to_config().as_str_name(),
            io.datatype.to_config().as_str_name()
        )));
    }
    if reshape.is_some() {
        return Err(Error::Load(format!(
            "{field}: reshape is not supported yet"
        )));
    }
    let graph_dims = if batch { &io.dims[1..] } else { &io.dims[..] };
    let fits = dims.len() == graph_dims.len()
        && dims.iter().zip(graph_dims).all(|(&c, &g)| g < 0 || c == g);
    if !fits {
        return Err(Error::Load(format!(
            "{field}: dims {dims:?} do not match the graph's {graph_dims:?}{}",
            if batch {
                " (batch dim excluded, max_batch_size > 0)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// The served signature of a completed config.
pub fn signature(config: &pb::ModelConfig) -> Signature {
    let io = |name: &str, data_type: i32, dims: &[i64]| IoSpec {
        name: name.to_string(),
        datatype: DataType::from_config_value(data_type).expect("checked by complete()"),
        dims: dims.to_vec(),
    };
    Signature {
        max_batch_size: config.max_batch_size.max(0) as usize,
        inputs: config
            .input
            .iter()
            .map(|i| io(&i.name, i.data_type, &i.dims))
            .collect(),
        outputs: config
            .output
            .iter()
            .map(|o| io(&o.name, o.data_type, &o.dims))
            .collect(),
        text_strings: backend(config).is_ok_and(|b| b == Backend::Onnx),
    }
}

/// What an identity model's graph is: its config's outputs echo its inputs by position.
pub fn identity_graph(config: &pb::ModelConfig) -> Result<GraphSpec, Error> {
    if config.input.is_empty() || config.input.len() != config.output.len() {
        return Err(Error::Load(
            "identity backend: config.pbtxt must list inputs and as many outputs (output i echoes input i)".into(),
        ));
    }
    let batch = config.max_batch_size > 0;
    let full = |dims: &[i64]| -> Vec<i64> {
        if batch {
            std::iter::once(-1).chain(dims.iter().copied()).collect()
        } else {
            dims.to_vec()
        }
    };
    let sig = |name: &str, t: i32, dims: &[i64]| -> Result<IoSpec, Error> {
        let datatype = DataType::from_config_value(t)
            .ok_or_else(|| Error::Load(format!("'{name}': data_type is missing or invalid")))?;
        Ok(IoSpec {
            name: name.into(),
            datatype,
            dims: full(dims),
        })
    };
    let inputs = config
        .input
        .iter()
        .map(|i| sig(&i.name, i.data_type, &i.dims))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = config
        .output
        .iter()
        .map(|o| sig(&o.name, o.data_type, &o.dims))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, o) in inputs.iter().zip(&outputs) {
        if i.datatype != o.datatype || i.dims != o.dims {
            return Err(Error::Load(format!(
                "identity backend: output '{}' must have input '{}''s data_type and dims",
                o.name, i.name
            )));
        }
    }
    Ok(GraphSpec { inputs, outputs })
}

mod caching;
pub mod fields;

pub use caching::{caching, Caching, SHARED as CACHE_SHARED};

#[cfg(test)]
mod tests;
