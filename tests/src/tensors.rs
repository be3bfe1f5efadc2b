//! Building requests and reading responses in tests.

use bytes::Bytes;
use infermesh_proto::{
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    ModelInferRequest, ModelInferResponse,
};

/// A raw input: name, datatype, shape and little-endian bytes.
pub fn raw(
    name: &str,
    datatype: &str,
    shape: &[i64],
    data: impl Into<Bytes>,
) -> (InferInputTensor, Bytes) {
    (
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        },
        data.into(),
    )
}

pub fn f32s(v: &[f32]) -> Bytes {
    v.iter()
        .flat_map(|x| x.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

pub fn read_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn read_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Length-prefixed BYTES elements.
pub fn strings(items: &[&[u8]]) -> Bytes {
    let mut out = Vec::new();
    for s in items {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s);
    }
    out.into()
}

pub fn request(model: &str, inputs: Vec<(InferInputTensor, Bytes)>) -> ModelInferRequest {
    let (inputs, raw): (Vec<_>, Vec<_>) = inputs.into_iter().unzip();
    ModelInferRequest {
        model_name: model.into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// `req` with a request parameter set (`timeout`, a mesh parameter...).
pub fn with_param(
    mut req: ModelInferRequest,
    key: &str,
    value: infermesh_proto::infer_parameter::ParameterChoice,
) -> ModelInferRequest {
    let param = infermesh_proto::InferParameter {
        parameter_choice: Some(value),
    };
    req.parameters.insert(key.into(), param);
    req
}

pub fn ask_outputs(mut req: ModelInferRequest, names: &[&str]) -> ModelInferRequest {
    req.outputs = names
        .iter()
        .map(|n| InferRequestedOutputTensor {
            name: n.to_string(),
            ..Default::default()
        })
        .collect();
    req
}

/// The raw bytes of output `name`.
pub fn output<'a>(resp: &'a ModelInferResponse, name: &str) -> &'a Bytes {
    let i = resp
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output '{name}' in {:?}", resp.outputs));
    &resp.raw_output_contents[i]
}

/// The bundled digits samples: 64-float rows and their expected labels.
pub fn digits_samples() -> (Vec<Vec<f32>>, Vec<i64>) {
    let text = std::fs::read_to_string(crate::models().join("digits/samples.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let labels = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_i64().unwrap())
        .collect();
    (rows, labels)
}
