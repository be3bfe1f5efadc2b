//! `sequence_batching` of a config.pbtxt, checked against the graph: the control inputs
//! the worker fills in, the implicit state it carries between a sequence's requests, and
//! the strategy's slots and batching.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use infermesh_core::{DataType, Tensor, TensorData};
use infermesh_proto::{
    self as pb,
    model_sequence_batching::{control::Kind, StrategyChoice},
};

use crate::{
    engine::{GraphSpec, IoSpec},
    model_config::BatchPolicy,
    Error,
};

/// Triton's default `max_sequence_idle_microseconds`: one second.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Policy {
    /// `oldest`; else `direct` (Triton's default).
    pub oldest: bool,
    /// Sequences active at once: `direct`, max_batch_size × instances; `oldest`,
    /// max_candidate_sequences. Bounded by the worker's `--max-sequence-slots`.
    pub slots: usize,
    /// An active sequence with no request for this long is released.
    pub idle: Duration,
    /// How the scheduler batches requests of different sequences.
    pub batch: Option<BatchPolicy>,
    pub controls: Vec<Control>,
    pub states: Vec<State>,
    /// The model batches (max_batch_size > 0): control and state tensors get a batch dim.
    pub batched: bool,
}

#[derive(Clone, Debug)]
pub struct Control {
    pub input: String,
    pub kind: Kind,
    pub datatype: DataType,
    /// Full shape of the tensor for one request (batch dim 1 when batched).
    pub shape: Vec<i64>,
    /// The element bytes for false and true (START, END, READY).
    pub false_true: [Bytes; 2],
}

#[derive(Clone, Debug)]
pub struct State {
    pub input: String,
    pub output: String,
    pub datatype: DataType,
    /// The state a sequence starts with, as the model's input for one request.
    pub initial: Tensor,
}

impl Policy {
    /// The names the worker feeds and keeps, which clients neither send nor see.
    pub fn hidden_inputs(config: &pb::ModelConfig) -> Vec<String> {
        let Some(sb) = of_config(config) else {
            return Vec::new();
        };
        sb.control_input
            .iter()
            .map(|c| c.name.clone())
            .chain(sb.state.iter().map(|s| s.input_name.clone()))
            .collect()
    }

    pub fn hidden_outputs(config: &pb::ModelConfig) -> Vec<String> {
        of_config(config)
            .map(|sb| sb.state.iter().map(|s| s.output_name.clone()).collect())
            .unwrap_or_default()
    }

    /// The policy of a config with `sequence_batching`, or None. `graph` is what the
    /// engine declares; `instances` how many run; `max_sequence_slots` the worker's bound.
    pub fn of(
        config: &pb::ModelConfig,
        graph: &GraphSpec,
        instances: usize,
        max_sequence_slots: usize,
        model_dir: &Path,
    ) -> Result<Option<Policy>, Error> {
        let Some(sb) = of_config(config) else {
            return Ok(None);
        };
        let err = |m: String| Error::Load(format!("sequence_batching.{m}"));
        if sb.iterative_sequence {
            return Err(err(
                "iterative_sequence: not supported (each request is answered once, by the model's own output)".into(),
            ));
        }
        for s in &sb.state {
            if s.use_same_buffer_for_input_output || s.use_growable_memory {
                tracing::warn!(model = %config.name, state = %s.input_name, "sequence_batching.state: use_same_buffer_for_input_output and use_growable_memory are ignored (device buffer reuse: speed only)");
            }
        }
        let batched = config.max_batch_size > 0;
        let max_batch = config.max_batch_size.max(1) as usize;
        if config.response_cache.as_ref().is_some_and(|r| r.enable) {
            return Err(Error::Load(
                "response_cache: not supported with sequence_batching (a stateful model's answer depends on its sequence's state)".into(),
            ));
        }
        // Triton's slots: max_batch_size per instance (max_candidate_sequences for
        // `oldest` where set).
        let per_instance = |n: i32| if n > 0 { n as usize } else { max_batch };
        let (oldest, per, delay, preferred) = match &sb.strategy_choice {
            Some(StrategyChoice::Oldest(o)) => {
                let preferred: Vec<usize> = o
                    .preferred_batch_size
                    .iter()
                    .filter(|&&p| p > 0 && p as usize <= max_batch)
                    .map(|&p| p as usize)
                    .collect();
                (
                    true,
                    per_instance(o.max_candidate_sequences),
                    o.max_queue_delay_microseconds,
                    preferred,
                )
            }
            Some(StrategyChoice::Direct(d)) => {
                // As in Triton, direct waits for company only with a utilization target;
                // the target itself is not read (a batch waits up to the delay for a full
                // one), which changes only speed.
                let wait = d.minimum_slot_utilization > 0.0;
                if wait {
                    tracing::warn!(model = %config.name, "sequence_batching.direct.minimum_slot_utilization: a batch waits up to max_queue_delay_microseconds for a full one; the fraction itself is not read (speed only)");
                }
                let delay = if wait {
                    d.max_queue_delay_microseconds
                } else {
                    0
                };
                (false, max_batch, delay, Vec::new())
            }
            None => (false, max_batch, 0, Vec::new()),
        };
        let slots = per * instances.max(1);
        let mut preferred = preferred;
        preferred.sort_unstable();
        preferred.dedup();
        let batch = batched.then(|| BatchPolicy {
            max_batch_size: max_batch,
            preferred,
            max_queue_delay: Duration::from_micros(delay),
            default_timeout: None,
            allow_timeout_override: true,
        });
        let idle = match sb.max_sequence_idle_microseconds {
            0 => DEFAULT_IDLE,
            us => Duration::from_micros(us),
        };
        let input = |field: &str, name: &str| {
            graph
                .inputs
                .iter()
                .find(|io| io.name == name)
                .ok_or_else(|| {
                    err(format!(
                        "{field}: the graph has no input '{name}' (it has: {})",
                        names(&graph.inputs)
                    ))
                })
        };
        let mut controls = Vec::new();
        for (i, ci) in sb.control_input.iter().enumerate() {
            let field = format!("control_input[{i}] '{}'", ci.name);
            let [control] = ci.control.as_slice() else {
                return Err(err(format!(
                    "{field}: expected one control, found {}",
                    ci.control.len()
                )));
            };
            let io = input(&field, &ci.name)?;
            controls.push(control_of(&field, control, io, batched).map_err(err)?);
        }
        let mut states = Vec::new();
        for (i, s) in sb.state.iter().enumerate() {
            let field = format!("state[{i}]");
            let io = input(&format!("{field}.input_name"), &s.input_name)?;
            let out = graph
                .outputs
                .iter()
                .find(|o| o.name == s.output_name)
                .ok_or_else(|| {
                    err(format!(
                        "{field}.output_name: the graph has no output '{}' (it has: {})",
                        s.output_name,
                        names(&graph.outputs)
                    ))
                })?;
            states.push(state_of(&field, s, io, out, batched, model_dir).map_err(err)?);
        }
        Ok(Some(Policy {
            oldest,
            slots: slots.min(max_sequence_slots.max(1)),
            idle,
            batch,
            controls,
            states,
            batched,
        }))
    }
}

fn of_config(config: &pb::ModelConfig) -> Option<&pb::ModelSequenceBatching> {
    match &config.scheduling_choice {
        Some(pb::model_config::SchedulingChoice::SequenceBatching(sb)) => Some(sb),
        _ => None,
    }
}

fn names(ios: &[IoSpec]) -> String {
    ios.iter()
        .map(|io| io.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One request's shape of a graph input the worker fills: batch dim 1, open dims 1.
fn one_request_shape(field: &str, io: &IoSpec, batched: bool) -> Result<Vec<i64>, String> {
    let shape: Vec<i64> = io.dims.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
    let per_row = if batched { &shape[1..] } else { &shape[..] };
    if per_row.iter().product::<i64>() != 1 {
        return Err(format!(
            "{field}: expected the graph's input to hold one value per request (dims [1]), found dims {:?}",
            io.dims
        ));
    }
    Ok(shape)
}

fn control_of(
    field: &str,
    c: &pb::model_sequence_batching::Control,
    io: &IoSpec,
    batched: bool,
) -> Result<Control, String> {
    let kind = Kind::try_from(c.kind).map_err(|_| format!("{field}.kind: unknown {}", c.kind))?;
    let shape = one_request_shape(field, io, batched)?;
    let (datatype, false_true) = if kind == Kind::ControlSequenceCorrid {
        let dt = DataType::from_config_value(c.data_type)
            .filter(|d| {
                matches!(
                    d,
                    DataType::U64
                        | DataType::I64
                        | DataType::U32
                        | DataType::I32
                        | DataType::Bytes
                )
            })
            .ok_or_else(|| {
                format!(
                    "{field}.data_type: expected TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 or TYPE_STRING for CONTROL_SEQUENCE_CORRID, found {}",
                    c.data_type
                )
            })?;
        (dt, [Bytes::new(), Bytes::new()])
    } else {
        let pair = |v: Vec<Vec<u8>>| -> Result<[Bytes; 2], String> {
            match <[Vec<u8>; 2]>::try_from(v) {
                Ok([f, t]) => Ok([f.into(), t.into()]),
                Err(v) => Err(format!(
                    "{field}: expected two values (false, true), found {}",
                    v.len()
                )),
            }
        };
        match (
            c.int32_false_true.is_empty(),
            c.fp32_false_true.is_empty(),
            c.bool_false_true.is_empty(),
        ) {
            (false, true, true) => (
                DataType::I32,
                pair(c.int32_false_true.iter().map(|v| v.to_le_bytes().to_vec()).collect())?,
            ),
            (true, false, true) => (
                DataType::F32,
                pair(c.fp32_false_true.iter().map(|v| v.to_le_bytes().to_vec()).collect())?,
            ),
            (true, true, false) => (
                DataType::Bool,
                pair(c.bool_false_true.iter().map(|&v| vec![v as u8]).collect())?,
            ),
            _ => {
                return Err(format!(
                    "{field}: expected exactly one of int32_false_true, fp32_false_true, bool_false_true"
                ))
            }
        }
    };
    if datatype != io.datatype {
        return Err(format!(
            "{field}: the control is {} but the graph's input is {}",
            datatype.as_str(),
            io.datatype.as_str()
        ));
    }
    Ok(Control {
        input: io.name.clone(),
        kind,
        datatype,
        shape,
        false_true,
    })
}

fn state_of(
    field: &str,
    s: &pb::model_sequence_batching::State,
    io: &IoSpec,
    out: &IoSpec,
    batched: bool,
    model_dir: &Path,
) -> Result<State, String> {
    let datatype = DataType::from_config_value(s.data_type)
        .ok_or_else(|| format!("{field}.data_type: missing or invalid"))?;
    let size = datatype.size().ok_or_else(|| {
        format!("{field}.data_type: TYPE_STRING state is not supported (fixed-size types only)")
    })?;
    for (what, g) in [("input", io), ("output", out)] {
        if g.datatype != datatype {
            return Err(format!(
                "{field}.data_type: {} but the graph's {what} '{}' is {}",
                datatype.as_str(),
                g.name,
                g.datatype.as_str()
            ));
        }
    }
    let graph_dims = if batched { &io.dims[1..] } else { &io.dims[..] };
    let fits = s.dims.len() == graph_dims.len()
        && s.dims
            .iter()
            .zip(graph_dims)
            .all(|(&c, &g)| g < 0 || c < 0 || c == g);
    if !fits {
        return Err(format!(
            "{field}.dims: {:?} do not match the graph's input '{}' {graph_dims:?}",
            s.dims, io.name
        ));
    }
    let (dims, data) = match s.initial_state.as_slice() {
        [] => {
            if s.dims.iter().any(|&d| d < 0) {
                return Err(format!(
                    "{field}.dims: {:?} has a variable dim; give initial_state with fixed dims",
                    s.dims
                ));
            }
            let count = s.dims.iter().product::<i64>() as usize;
            (s.dims.clone(), Bytes::from(vec![0u8; count * size]))
        }
        [init] => initial(field, init, datatype, size, model_dir)?,
        more => {
            return Err(format!(
                "{field}.initial_state: expected one, found {}",
                more.len()
            ))
        }
    };
    let shape = if batched {
        std::iter::once(1).chain(dims).collect()
    } else {
        dims
    };
    Ok(State {
        input: s.input_name.clone(),
        output: s.output_name.clone(),
        datatype,
        initial: Tensor {
            name: s.input_name.clone(),
            datatype,
            shape,
            data: TensorData::Fixed(data),
        },
    })
}

/// An `initial_state`: zeros, or a file in the model's `initial_state/` directory
/// holding the tensor's raw bytes, as Triton reads it.
fn initial(
    field: &str,
    init: &pb::model_sequence_batching::InitialState,
    datatype: DataType,
    size: usize,
    model_dir: &Path,
) -> Result<(Vec<i64>, Bytes), String> {
    let field = format!("{field}.initial_state");
    if init.data_type != datatype.to_config() as i32 {
        return Err(format!(
            "{field}.data_type: expected the state's {}",
            datatype.as_str()
        ));
    }
    if init.dims.iter().any(|&d| d < 0) {
        return Err(format!(
            "{field}.dims: expected fixed dims, found {:?}",
            init.dims
        ));
    }
    let len = init.dims.iter().product::<i64>() as usize * size;
    use pb::model_sequence_batching::initial_state::StateData;
    let data = match &init.state_data {
        Some(StateData::ZeroData(true)) => Bytes::from(vec![0u8; len]),
        Some(StateData::DataFile(file)) => {
            let plain = Path::new(file)
                .file_name()
                .is_some_and(|n| n == std::ffi::OsStr::new(file));
            if !plain || file == ".." {
                return Err(format!(
                    "{field}.data_file: expected a file name in the model's initial_state/ directory, found '{file}'"
                ));
            }
            let path = model_dir.join("initial_state").join(file);
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("{field}.data_file: cannot read {}: {e}", path.display()))?;
            if bytes.len() != len {
                return Err(format!(
                    "{field}.data_file: expected {len} bytes for dims {:?}, found {}",
                    init.dims,
                    bytes.len()
                ));
            }
            bytes.into()
        }
        _ => return Err(format!("{field}: expected zero_data: true or a data_file")),
    };
    Ok((init.dims.clone(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(name: &str, datatype: DataType, dims: &[i64]) -> IoSpec {
        IoSpec {
            name: name.into(),
            datatype,
            dims: dims.to_vec(),
        }
    }

    fn graph() -> GraphSpec {
        GraphSpec {
            inputs: vec![
                io("INPUT", DataType::F32, &[-1, 4]),
                io("STATE_IN", DataType::F32, &[-1, 4]),
                io("START", DataType::I32, &[-1, 1]),
                io("CORRID", DataType::U64, &[-1, 1]),
            ],
            outputs: vec![
                io("OUTPUT", DataType::F32, &[-1, 4]),
                io("STATE_OUT", DataType::F32, &[-1, 4]),
            ],
        }
    }

    fn policy(sequence_batching: &str) -> Result<Option<Policy>, String> {
        let config = crate::model_config::parse(&format!(
            "max_batch_size: 8\nsequence_batching {{ {sequence_batching} }}"
        ))
        .unwrap();
        Policy::of(&config, &graph(), 2, 1024, Path::new("/nonexistent")).map_err(|e| e.to_string())
    }

    const STATE: &str = "state [ { input_name: \"STATE_IN\" output_name: \"STATE_OUT\" data_type: TYPE_FP32 dims: [ 4 ] } ]";

    #[test]
    fn slots_and_batching_follow_the_strategy() {
        let direct = policy(STATE).unwrap().unwrap();
        assert!(!direct.oldest);
        let waits = |text: &str| {
            policy(text)
                .unwrap()
                .unwrap()
                .batch
                .unwrap()
                .max_queue_delay
        };
        assert_eq!(
            waits(&format!(
                "direct {{ max_queue_delay_microseconds: 700 }} {STATE}"
            )),
            Duration::ZERO,
            "no utilization target: no wait"
        );
        assert_eq!(
            waits(&format!("direct {{ max_queue_delay_microseconds: 700 minimum_slot_utilization: 0.5 }} {STATE}")),
            Duration::from_micros(700)
        );
        assert_eq!(
            direct.slots, 16,
            "max_batch_size per instance, two instances"
        );
        assert_eq!(direct.idle, DEFAULT_IDLE);
        let oldest = policy(&format!(
            "oldest {{ max_candidate_sequences: 40 preferred_batch_size: [ 4, 99 ] max_queue_delay_microseconds: 300 }} max_sequence_idle_microseconds: 2000 {STATE}"
        ))
        .unwrap()
        .unwrap();
        assert!(oldest.oldest);
        assert_eq!(oldest.slots, 80);
        assert_eq!(oldest.idle, Duration::from_millis(2));
        let batch = oldest.batch.unwrap();
        assert_eq!(
            batch.preferred,
            vec![4],
            "sizes above max_batch_size dropped"
        );
        assert_eq!(batch.max_queue_delay, Duration::from_micros(300));
        let state = &oldest.states[0];
        assert_eq!(state.initial.shape, vec![1, 4]);
        // The worker's bound caps the slots.
        let config = crate::model_config::parse(&format!(
            "max_batch_size: 8\nsequence_batching {{ oldest {{ max_candidate_sequences: 500 }} {STATE} }}"
        ))
        .unwrap();
        let capped = Policy::of(&config, &graph(), 1, 100, Path::new("/x"))
            .unwrap()
            .unwrap();
        assert_eq!(capped.slots, 100);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_field() {
        for (text, want) in [
            ("iterative_sequence: true", "sequence_batching.iterative_sequence"),
            (
                "control_input [ { name: \"START\" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] } ]",
                "control_input[0] 'START': the control is FP32 but the graph's input is INT32",
            ),
            (
                "control_input [ { name: \"START\" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0 ] } ] } ]",
                "expected two values (false, true), found 1",
            ),
            (
                "control_input [ { name: \"CORRID\" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 } ] } ]",
                "control_input[0] 'CORRID'.data_type",
            ),
            (
                "control_input [ { name: \"INPUT\" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] } ]",
                "expected the graph's input to hold one value per request",
            ),
            (
                "state [ { input_name: \"STATE_IN\" output_name: \"NOPE\" data_type: TYPE_FP32 dims: [ 4 ] } ]",
                "state[0].output_name: the graph has no output 'NOPE'",
            ),
            (
                "state [ { input_name: \"STATE_IN\" output_name: \"STATE_OUT\" data_type: TYPE_FP32 dims: [ 5 ] } ]",
                "state[0].dims: [5] do not match",
            ),
            (
                "state [ { input_name: \"STATE_IN\" output_name: \"STATE_OUT\" data_type: TYPE_FP32 dims: [ -1 ] } ]",
                "give initial_state with fixed dims",
            ),
            (
                "state [ { input_name: \"STATE_IN\" output_name: \"STATE_OUT\" data_type: TYPE_FP32 dims: [ 4 ] initial_state [ { data_type: TYPE_FP32 dims: [ 4 ] data_file: \"../x\" } ] } ]",
                "expected a file name in the model's initial_state/ directory",
            ),
        ] {
            let err = policy(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
