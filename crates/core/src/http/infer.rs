//! An inference request in KServe v2 JSON (with Triton's binary tensor data extension)
//! as the ModelInferRequest the gRPC path takes, and a ModelInferResponse back as JSON,
//! or as a JSON header followed by the outputs' raw bytes when the client asked for
//! binary outputs.
//!
//! The binary extension: the body's first `Inference-Header-Content-Length` bytes are the
//! JSON; an input with the parameter `binary_data_size` takes its bytes, in input order,
//! from what follows. An output whose parameter `binary_data` is true (or every output,
//! with the request parameter `binary_data_output: true`) comes back the same way. These
//! parameters belong to the transport: they are not passed on to the model.

use std::collections::HashMap;

use bytes::Bytes;
use infermesh_proto::{
    infer_parameter::ParameterChoice,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    InferParameter, ModelInferRequest, ModelInferResponse,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::tensor_json;
use crate::{tensor::Tensor, DataType};

/// The request's JSON, as written (tensor data borrowed, read when its datatype is known).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request<'a> {
    #[serde(default)]
    id: String,
    #[serde(default, borrow)]
    parameters: Option<HashMap<String, &'a RawValue>>,
    #[serde(borrow)]
    inputs: Vec<Input<'a>>,
    #[serde(default, borrow)]
    outputs: Option<Vec<Output<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, borrow)]
    parameters: Option<HashMap<String, &'a RawValue>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Output<'a> {
    name: String,
    #[serde(default, borrow)]
    parameters: Option<HashMap<String, &'a RawValue>>,
}

/// Parameters of the binary extension, read here and never passed on.
const BINARY_DATA_SIZE: &str = "binary_data_size";
const BINARY_DATA: &str = "binary_data";
const BINARY_DATA_OUTPUT: &str = "binary_data_output";

/// A request as the gRPC path takes it, and which outputs go back as binary.
pub struct Parsed {
    pub request: ModelInferRequest,
    pub binary: Binary,
}

/// Which outputs the client wants as raw bytes after the JSON.
#[derive(Default)]
pub struct Binary {
    /// Every output (`binary_data_output: true`), unless an output says otherwise.
    pub all: bool,
    /// Outputs that said, by name.
    pub named: HashMap<String, bool>,
}

impl Binary {
    fn wants(&self, output: &str) -> bool {
        self.named.get(output).copied().unwrap_or(self.all)
    }
}

/// Reads `body` (`header_len`: the JSON's length under the binary extension, else the
/// whole body) for `model` and `version`.
pub fn parse(
    body: &Bytes,
    header_len: Option<usize>,
    model: &str,
    version: &str,
) -> Result<Parsed, String> {
    let json_len = match header_len {
        Some(n) if n > body.len() => {
            return Err(format!(
                "Inference-Header-Content-Length: expected at most the body's {} bytes, found {n}",
                body.len()
            ))
        }
        Some(n) => n,
        None => body.len(),
    };
    let text = std::str::from_utf8(&body[..json_len])
        .map_err(|e| format!("the request's JSON is not UTF-8: {e}"))?;
    // Float data read in one pass where the text allows; serde reads the rest.
    let (envelope, mut read_data) = match super::prescan::prescan(text) {
        Some(p) => (std::borrow::Cow::Owned(p.envelope), p.data),
        None => (std::borrow::Cow::Borrowed(text), HashMap::new()),
    };
    let req: Request<'_> =
        serde_json::from_str(&envelope).map_err(|e| format!("the request's JSON: {e}"))?;
    let mut binary = Binary::default();
    let mut parameters = params(req.parameters.as_ref(), "parameters")?;
    if let Some(p) = parameters.remove(BINARY_DATA_OUTPUT) {
        binary.all = as_bool(&p, BINARY_DATA_OUTPUT)?;
    }
    let mut rest = body.slice(json_len..);
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut raw = Vec::with_capacity(req.inputs.len());
    for (k, input) in req.inputs.iter().enumerate() {
        let (tensor, bytes) = read_input(input, &mut rest, read_data.remove(&k))?;
        inputs.push(tensor);
        raw.push(bytes);
    }
    if !rest.is_empty() {
        return Err(format!(
            "the body has {} bytes after the inputs' binary data (binary_data_size) ended",
            rest.len()
        ));
    }
    let mut outputs = Vec::new();
    for output in req.outputs.iter().flatten() {
        let what = format!("output '{}' parameters", output.name);
        let mut parameters = params(output.parameters.as_ref(), &what)?;
        if let Some(p) = parameters.remove(BINARY_DATA) {
            binary
                .named
                .insert(output.name.clone(), as_bool(&p, &what)?);
        }
        outputs.push(InferRequestedOutputTensor {
            name: output.name.clone(),
            parameters,
        });
    }
    Ok(Parsed {
        request: ModelInferRequest {
            model_name: model.to_string(),
            model_version: version.to_string(),
            id: req.id,
            parameters,
            inputs,
            outputs,
            raw_input_contents: raw,
        },
        binary,
    })
}

/// One input: its tensor and its bytes, from `data` or from the binary part.
fn read_input(
    input: &Input<'_>,
    rest: &mut Bytes,
    read: Option<Vec<u8>>,
) -> Result<(InferInputTensor, Bytes), String> {
    let name = &input.name;
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        format!(
            "input '{name}': datatype: expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES, found '{}'",
            crate::text::clip(&input.datatype)
        )
    })?;
    let mut parameters = params(
        input.parameters.as_ref(),
        &format!("input '{name}' parameters"),
    )?;
    let size = parameters.remove(BINARY_DATA_SIZE);
    let bytes = match (size, input.data) {
        (Some(_), _) if read.is_some() => {
            return Err(format!(
                "input '{name}': expected `data` or the parameter binary_data_size, found both"
            ))
        }
        (None, _) if read.is_some() => Bytes::from(read.expect("checked")),
        (Some(_), Some(_)) => {
            return Err(format!(
                "input '{name}': expected `data` or the parameter binary_data_size, found both"
            ))
        }
        (Some(p), None) => {
            let n = match p.parameter_choice {
                Some(ParameterChoice::Int64Param(n)) if n >= 0 => n as u64,
                Some(ParameterChoice::Uint64Param(n)) => n,
                _ => {
                    return Err(format!(
                        "input '{name}': binary_data_size: expected a byte count, 0 or more"
                    ))
                }
            };
            if n > rest.len() as u64 {
                return Err(format!(
                    "input '{name}': binary_data_size is {n} bytes but only {} bytes of binary data are left in the body",
                    rest.len()
                ));
            }
            rest.split_to(n as usize)
        }
        (None, Some(data)) => {
            let mut out = Vec::new();
            tensor_json::read(data.get(), datatype, &mut out)
                .map_err(|e| format!("input '{name}' data: {e}"))?;
            Bytes::from(out)
        }
        (None, None) => {
            return Err(format!(
                "input '{name}': expected `data` or the parameter binary_data_size, found neither"
            ))
        }
    };
    let tensor = InferInputTensor {
        name: name.clone(),
        datatype: datatype.as_str().to_string(),
        shape: input.shape.clone(),
        parameters,
        contents: None,
    };
    Ok((tensor, bytes))
}

/// JSON parameters (bool, integer, number or string values) as the protocol's.
fn params(
    json: Option<&HashMap<String, &RawValue>>,
    what: &str,
) -> Result<HashMap<String, InferParameter>, String> {
    let mut out = HashMap::new();
    for (key, value) in json.into_iter().flatten() {
        let v: serde_json::Value = serde_json::from_str(value.get()).map_err(|e| e.to_string())?;
        let choice = match v {
            serde_json::Value::Bool(b) => ParameterChoice::BoolParam(b),
            serde_json::Value::String(s) => ParameterChoice::StringParam(s),
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => ParameterChoice::Int64Param(i),
                (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
                _ => return Err(format!("{what}: '{key}': a number out of range")),
            },
            other => {
                return Err(format!(
                    "{what}: '{}': expected a bool, number or string, found {}",
                    crate::text::clip(key),
                    kind(&other)
                ))
            }
        };
        out.insert(
            key.clone(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
    }
    Ok(out)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a value",
    }
}

fn as_bool(p: &InferParameter, what: &str) -> Result<bool, String> {
    match p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Ok(b),
        _ => Err(format!("{what}: expected true or false")),
    }
}

/// An answer: the body, and the JSON header's length when binary outputs follow it.
pub struct Answer {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// Writes `resp` as the client asked: JSON outputs, or binary ones after the JSON.
pub fn answer(resp: &ModelInferResponse, binary: &Binary) -> Result<Answer, String> {
    let mut json = String::with_capacity(256);
    json.push_str("{\"model_name\":");
    json.push_str(&quote(&resp.model_name));
    json.push_str(",\"model_version\":");
    json.push_str(&quote(&resp.model_version));
    if !resp.id.is_empty() {
        json.push_str(",\"id\":");
        json.push_str(&quote(&resp.id));
    }
    if !resp.parameters.is_empty() {
        json.push_str(",\"parameters\":");
        write_params(&resp.parameters, &mut json);
    }
    json.push_str(",\"outputs\":[");
    let mut tail: Vec<Bytes> = Vec::new();
    for (i, o) in resp.outputs.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let datatype = DataType::parse(&o.datatype)
            .ok_or_else(|| format!("output '{}' has datatype '{}'", o.name, o.datatype))?;
        let raw = match resp.raw_output_contents.get(i) {
            Some(raw) => raw.clone(),
            None => typed(o)?,
        };
        json.push_str("{\"name\":");
        json.push_str(&quote(&o.name));
        json.push_str(",\"datatype\":");
        json.push_str(&quote(datatype.as_str()));
        json.push_str(",\"shape\":[");
        for (j, d) in o.shape.iter().enumerate() {
            if j > 0 {
                json.push(',');
            }
            json.push_str(&d.to_string());
        }
        json.push(']');
        // Parameters only on a binary output: Triton's C++ client (perf_analyzer) reads an
        // output's parameters as the binary extension's and needs binary_data_size there.
        if binary.wants(&o.name) {
            let mut params = o.parameters.clone();
            params.insert(
                BINARY_DATA_SIZE.into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Uint64Param(raw.len() as u64)),
                },
            );
            json.push_str(",\"parameters\":");
            write_params(&params, &mut json);
        }
        if binary.wants(&o.name) {
            tail.push(raw);
        } else {
            json.push_str(",\"data\":");
            tensor_json::write(&raw, datatype, &mut json)
                .map_err(|e| format!("output '{}': {e}", o.name))?;
        }
        json.push('}');
    }
    json.push_str("]}");
    if tail.is_empty() {
        return Ok(Answer {
            body: json.into_bytes(),
            header_len: None,
        });
    }
    let header_len = json.len();
    let mut body = json.into_bytes();
    body.reserve(tail.iter().map(Bytes::len).sum());
    for t in &tail {
        body.extend_from_slice(t);
    }
    Ok(Answer {
        body,
        header_len: Some(header_len),
    })
}

/// An output sent in typed contents, as raw bytes.
fn typed(o: &infermesh_proto::model_infer_response::InferOutputTensor) -> Result<Bytes, String> {
    let t = Tensor::decode_output(o, None).map_err(|e| e.to_string())?;
    Ok(t.to_raw())
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn write_params(params: &HashMap<String, InferParameter>, out: &mut String) {
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quote(k));
        out.push(':');
        let v = match &params[k].parameter_choice {
            Some(ParameterChoice::BoolParam(b)) => b.to_string(),
            Some(ParameterChoice::Int64Param(n)) => n.to_string(),
            Some(ParameterChoice::Uint64Param(n)) => n.to_string(),
            Some(ParameterChoice::DoubleParam(f)) if f.is_finite() => f.to_string(),
            Some(ParameterChoice::StringParam(s)) => quote(s),
            _ => "null".into(),
        };
        out.push_str(&v);
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use infermesh_proto::model_infer_response::InferOutputTensor;

    use super::*;

    #[test]
    fn json_and_binary_inputs_become_raw_contents() {
        let json = br#"{"id":"7","inputs":[{"name":"a","shape":[2],"datatype":"FP32","data":[1,2]},{"name":"b","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}],"parameters":{"priority":1}}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&5i64.to_le_bytes());
        let p = parse(&Bytes::from(body), Some(json.len()), "m", "").unwrap();
        let r = &p.request;
        assert_eq!((r.model_name.as_str(), r.id.as_str()), ("m", "7"));
        assert_eq!(
            r.raw_input_contents[0].as_ref(),
            [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()
        );
        assert_eq!(r.raw_input_contents[1].as_ref(), 5i64.to_le_bytes());
        assert!(
            r.inputs[1].parameters.is_empty(),
            "binary_data_size is not passed on"
        );
        assert!(r.parameters.contains_key("priority") && r.outputs[0].parameters.is_empty());
        assert!(p.binary.wants("y") && !p.binary.wants("z"));
    }

    #[test]
    fn mistakes_name_the_field() {
        for (json, header, expect) in [
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP33","data":[1]}]}"#,
                None,
                "found 'FP33'",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"}]}"#,
                None,
                "found neither",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":9}}]}"#,
                None,
                "only 0 bytes",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","data":[256]}]}"#,
                None,
                "input 'a' data: element 0: 256 is out of range",
            ),
            (r#"{"inputs":[],"extra":1}"#, None, "unknown field `extra`"),
            (r#"{"inputs":[}"#, None, "the request's JSON"),
            (r#"{"inputs":[]}"#, Some(99), "found 99"),
        ] {
            let err = parse(&Bytes::from(json), header, "m", "").err().unwrap();
            assert!(err.contains(expect), "{json}: {err}");
        }
    }

    #[test]
    fn answers_are_json_or_binary_after_the_header() {
        let resp = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            outputs: vec![InferOutputTensor {
                name: "y".into(),
                datatype: "INT32".into(),
                shape: vec![2],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from(
                [3i32.to_le_bytes(), (-4i32).to_le_bytes()].concat(),
            )],
            ..Default::default()
        };
        let a = answer(&resp, &Binary::default()).unwrap();
        assert_eq!(
            String::from_utf8(a.body).unwrap(),
            r#"{"model_name":"m","model_version":"1","outputs":[{"name":"y","datatype":"INT32","shape":[2],"data":[3,-4]}]}"#
        );
        let a = answer(
            &resp,
            &Binary {
                all: true,
                ..Default::default()
            },
        )
        .unwrap();
        let n = a.header_len.unwrap();
        assert!(String::from_utf8_lossy(&a.body[..n])
            .contains(r#""parameters":{"binary_data_size":8}"#));
        assert_eq!(a.body.len(), n + 8);
    }
}
