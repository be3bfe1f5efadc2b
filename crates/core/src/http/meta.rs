//! The small answers as KServe v2 JSON: server and model metadata, the repository index,
//! and config and statistics as Triton writes them (the protobuf JSON mapping with the
//! proto's own snake_case field names, every primitive field printed, 64-bit integers as
//! numbers).

use std::sync::OnceLock;

use infermesh_proto as pb;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{json, Value};

pub fn server_metadata(m: &pb::ServerMetadataResponse) -> Value {
    json!({"name": m.name, "version": m.version, "extensions": m.extensions})
}

pub fn model_metadata(m: &pb::ModelMetadataResponse) -> Value {
    let tensors = |ts: &[pb::model_metadata_response::TensorMetadata]| {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    json!({
        "name": m.name, "versions": m.versions, "platform": m.platform,
        "inputs": tensors(&m.inputs), "outputs": tensors(&m.outputs),
    })
}

pub fn index(r: &pb::RepositoryIndexResponse) -> Value {
    r.models
        .iter()
        .map(|m| {
            let mut v = json!({"name": m.name, "state": m.state});
            if !m.version.is_empty() {
                v["version"] = m.version.clone().into();
            }
            if !m.reason.is_empty() {
                v["reason"] = m.reason.clone().into();
            }
            v
        })
        .collect()
}

/// A message of the inference protos as Triton's JSON.
pub fn proto_json(msg: &impl prost::Message, full_name: &str) -> Result<Vec<u8>, String> {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the compiled-in descriptors decode")
    });
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("no message {full_name}"))?;
    let dynamic =
        DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| e.to_string())?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &options)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_as_tritons_json() {
        let config = pb::ModelConfig {
            name: "m".into(),
            max_batch_size: 8,
            input: vec![pb::ModelInput {
                name: "x".into(),
                data_type: pb::DataType::TypeFp32 as i32,
                dims: vec![16],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text =
            String::from_utf8(proto_json(&config, "inference.ModelConfig").unwrap()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["max_batch_size"], 8);
        assert_eq!(v["input"][0]["dims"], json!([16]));
        assert_eq!(v["input"][0]["data_type"], "TYPE_FP32");
        assert!(
            v.get("dynamic_batching").is_none(),
            "unset messages are left out: {text}"
        );
    }
}
