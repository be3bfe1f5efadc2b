//! Every field of `ModelConfig` is honoured, ignored with one warning (it only changes
//! speed), or refused at load with its name (ignoring it would change answers or promises).
//! `POLICY` lists them all; a test walks the proto's descriptor and fails on any field it
//! does not list, and docs/models.md shows the same table.

use infermesh_proto as pb;

/// What the worker does with a field when a config.pbtxt sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    Honoured,
    /// Only speed would differ: loaded, with one warning naming it.
    Warned,
    /// Refused at load, naming the field.
    Refused,
}

use Handling::*;

/// Each top-level field of `ModelConfig`, what is done with it, and why.
pub const POLICY: &[(&str, Handling, &str)] = &[
    ("name", Honoured, "must match the model directory"),
    ("platform", Honoured, "\"onnxruntime_onnx\" (or empty)"),
    ("backend", Honoured, "\"onnxruntime\" or \"identity\""),
    ("runtime", Refused, "a custom backend library; only the built-in backends run"),
    ("version_policy", Honoured, "latest N, all, specific"),
    ("max_batch_size", Honoured, "> 0: the first dim is the batch dim"),
    ("input", Honoured, "names, data types, dims, optional; `reshape` is refused"),
    ("output", Honoured, "names, data types, dims, `label_filename` (the classification extension's labels); `reshape` is refused"),
    ("batch_input", Refused, "ragged batching changes the inputs the model sees"),
    ("batch_output", Refused, "ragged batching changes the outputs"),
    ("optimization", Warned, "execution accelerators (TensorRT, OpenVINO), graph level, CUDA graphs, pinned memory: speed only"),
    ("dynamic_batching", Honoured, "preferred sizes, queue delay, queue policy"),
    ("sequence_batching", Honoured, "`direct` and `oldest` (max_candidate_sequences, preferred_batch_size, max_queue_delay_microseconds, preserve_ordering), max_sequence_idle_microseconds, control_input (START, END, READY, CORRID), implicit `state` with `initial_state`; `iterative_sequence` is refused; `direct.max_queue_delay_microseconds` applies, as in Triton, only with `minimum_slot_utilization` > 0, whose fraction is not read (one warning: speed only); `use_same_buffer_for_input_output` and `use_growable_memory` are ignored with a warning (speed only)"),
    ("ensemble_scheduling", Refused, "ensembles are not served"),
    ("instance_group", Honoured, "count, kind, gpus; `rate_limiter`, `host_policy`, `passive`, `secondary_devices` and `profile` are refused"),
    ("default_model_filename", Refused, "the model file is always model.onnx (refused unless it names that)"),
    ("cc_model_filenames", Refused, "per-GPU model files are not chosen"),
    ("metric_tags", Refused, "metrics carry no custom labels"),
    ("parameters", Honoured, "`infermesh_response_cache_shared` (every backend); the identity backend's delay_ms, failure_rate, stall_rate, stall_ms and crash parameters; any other is refused for ONNX models"),
    ("model_warmup", Honoured, "zero_data, random_data and input_data_file (from the model's warmup/ directory) samples, `count` times on every instance before READY; a failed sample fails the load"),
    ("model_operations", Refused, "custom operator libraries are not loaded"),
    ("model_transaction_policy", Honoured, "decoupled: false; decoupled: true is refused"),
    ("model_repository_agents", Refused, "repository agents (checksum, decryption) do not run"),
    ("response_cache", Honoured, "`enable: true` caches answers in the worker's `--cache-config local,size=BYTES` cache, per tenant unless `infermesh_response_cache_shared` is \"true\"; without the flag, one warning (speed only)"),
    ("model_metrics", Refused, "metric settings (histogram buckets) are not configurable"),
];

/// Checks the fields a config sets against [`POLICY`]: the first refused one is an error
/// naming it; the warned ones are returned for one log line each.
pub fn check(config: &pb::ModelConfig) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for (field, set) in set_fields(config) {
        let Some((_, handling, why)) = POLICY.iter().find(|(f, _, _)| *f == field) else {
            return Err(format!("{field}: not a field this worker knows"));
        };
        match (handling, set) {
            (_, Set::No) | (Honoured, _) => {}
            (Warned, _) => warnings.push(format!("{field} is ignored ({why})")),
            (Refused, Set::Yes) => return Err(format!("{field}: not supported ({why})")),
            (Refused, Set::Fine) => {}
        }
    }
    nested(config)?;
    Ok(warnings)
}

enum Set {
    No,
    Yes,
    /// Set, but to the one value that changes nothing.
    Fine,
}

fn yes(b: bool) -> Set {
    if b {
        Set::Yes
    } else {
        Set::No
    }
}

/// Whether each field of `POLICY` is set in `config`.
fn set_fields(c: &pb::ModelConfig) -> Vec<(&'static str, Set)> {
    use pb::model_config::SchedulingChoice as S;
    let scheduling = c.scheduling_choice.as_ref();
    vec![
        ("runtime", yes(!c.runtime.is_empty())),
        ("batch_input", yes(!c.batch_input.is_empty())),
        ("batch_output", yes(!c.batch_output.is_empty())),
        ("optimization", yes(c.optimization.is_some())),
        (
            "ensemble_scheduling",
            yes(matches!(scheduling, Some(S::EnsembleScheduling(_)))),
        ),
        (
            "default_model_filename",
            match c.default_model_filename.as_str() {
                "" => Set::No,
                "model.onnx" => Set::Fine,
                _ => Set::Yes,
            },
        ),
        ("cc_model_filenames", yes(!c.cc_model_filenames.is_empty())),
        ("metric_tags", yes(!c.metric_tags.is_empty())),
        ("model_warmup", yes(!c.model_warmup.is_empty())),
        ("model_operations", yes(c.model_operations.is_some())),
        (
            "model_repository_agents",
            yes(c.model_repository_agents.is_some()),
        ),
        (
            "response_cache",
            yes(c.response_cache.as_ref().is_some_and(|r| r.enable)),
        ),
        ("model_metrics", yes(c.model_metrics.is_some())),
    ]
}

/// The nested fields that would change answers or promises.
fn nested(c: &pb::ModelConfig) -> Result<(), String> {
    if c.model_transaction_policy
        .as_ref()
        .is_some_and(|p| p.decoupled)
    {
        return Err(
            "model_transaction_policy.decoupled: not supported (each request gets exactly one response)"
                .into(),
        );
    }
    for (g, group) in c.instance_group.iter().enumerate() {
        let refused = [
            ("rate_limiter", group.rate_limiter.is_some()),
            ("host_policy", !group.host_policy.is_empty()),
            ("passive", group.passive),
            ("secondary_devices", !group.secondary_devices.is_empty()),
            ("profile", !group.profile.is_empty()),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, set)| *set) {
            return Err(format!(
                "instance_group[{g}].{field}: not supported (instances run as the group's count, kind and gpus say)"
            ));
        }
    }
    let engine_keys: Vec<&str> = c
        .parameters
        .keys()
        .map(String::as_str)
        .filter(|k| *k != super::CACHE_SHARED)
        .collect();
    if !engine_keys.is_empty() && c.backend != "identity" {
        let keys = engine_keys;
        return Err(format!(
            "parameters: not read by the ONNX Runtime backend (got {keys:?}); only the identity backend takes parameters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost_reflect::DescriptorPool;

    use super::*;

    /// Every field of ModelConfig in the compiled proto is in POLICY, and nothing else.
    #[test]
    fn the_policy_lists_every_field_of_model_config() {
        let pool = DescriptorPool::decode(infermesh_proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool.get_message_by_name("inference.ModelConfig").unwrap();
        let mut proto: Vec<String> = desc.fields().map(|f| f.name().to_string()).collect();
        let mut listed: Vec<String> = POLICY.iter().map(|(f, _, _)| f.to_string()).collect();
        proto.sort();
        listed.sort();
        assert_eq!(proto, listed);
        // And docs/models.md shows each of them.
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/models.md"),
        )
        .unwrap();
        for (field, _, _) in POLICY {
            assert!(
                doc.contains(&format!("| `{field}` |")),
                "docs/models.md lacks `{field}`"
            );
        }
    }

    #[test]
    fn refused_fields_are_named_and_speed_hints_warned() {
        let cfg = |text: &str| crate::model_config::parse(text).unwrap();
        for (text, names) in [
            ("ensemble_scheduling { step [] }", "ensemble_scheduling"),
            (
                "instance_group [ { count: 1 rate_limiter { priority: 1 } } ]",
                "instance_group[0].rate_limiter",
            ),
            (
                "model_transaction_policy { decoupled: true }",
                "model_transaction_policy.decoupled",
            ),
            (
                "default_model_filename: \"other.onnx\"",
                "default_model_filename",
            ),
        ] {
            let e = check(&cfg(text)).unwrap_err();
            assert!(e.starts_with(names), "{text}: {e}");
        }
        let warned = check(&cfg(
            "response_cache { enable: true }\noptimization { execution_accelerators { gpu_execution_accelerator [ { name: \"tensorrt\" } ] } }",
        ))
        .unwrap();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].starts_with("optimization"));
        assert!(check(&cfg(
            "default_model_filename: \"model.onnx\"\nmax_batch_size: 8"
        ))
        .unwrap()
        .is_empty());
    }
}
