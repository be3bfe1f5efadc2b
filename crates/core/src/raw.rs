//! Inference messages as the handler frame and the stream server see them: a worker's are
//! decoded in full (it runs them); a gateway's stay the bytes that came, read only as far
//! as routing needs (`RawRequest`), and its answers are the bytes a worker sent
//! (`RawAnswer`). Nothing in between decodes or re-encodes a tensor.
//!
//! A raw request is read exactly as the worker will read it: protobuf lets a field appear
//! more than once, anywhere, and prost keeps the last value of a singular field and merges
//! map entries by key — the routing view below is decoded by prost itself, so the gateway
//! (auth, routing) and the worker agree on every request.

use std::collections::HashMap;

use bytes::{BufMut, Bytes};
use infermesh_proto as pb;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};

pub type Parameters = HashMap<String, pb::InferParameter>;

/// What the frame and the stream server read of an inference request.
pub trait InferRequest: Send + 'static {
    fn model_name(&self) -> &str;
    fn model_version(&self) -> &str;
    fn id(&self) -> &str;
    fn parameters(&self) -> &Parameters;
}

/// An inference answer, and the message that carries it on a stream.
pub trait InferAnswer: Send + 'static {
    type Streamed: Send + 'static;
    fn encoded_len(&self) -> usize;
    fn streamed(self) -> Self::Streamed;
    /// A failed stream message's answer (`stream::failure` builds it).
    fn failed(answer: pb::ModelStreamInferResponse) -> Self::Streamed;
    fn streamed_len(message: &Self::Streamed) -> usize;
}

/// A request type with the routing fields under their protobuf names.
macro_rules! infer_request {
    ($t:ty) => {
        impl InferRequest for $t {
            fn model_name(&self) -> &str {
                &self.model_name
            }
            fn model_version(&self) -> &str {
                &self.model_version
            }
            fn id(&self) -> &str {
                &self.id
            }
            fn parameters(&self) -> &Parameters {
                &self.parameters
            }
        }
    };
}

infer_request!(pb::ModelInferRequest);
infer_request!(RawRequest);

impl InferAnswer for pb::ModelInferResponse {
    type Streamed = pb::ModelStreamInferResponse;
    fn encoded_len(&self) -> usize {
        prost::Message::encoded_len(self)
    }
    fn streamed(self) -> pb::ModelStreamInferResponse {
        pb::ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(self),
        }
    }
    fn failed(answer: pb::ModelStreamInferResponse) -> pb::ModelStreamInferResponse {
        answer
    }
    fn streamed_len(message: &pb::ModelStreamInferResponse) -> usize {
        prost::Message::encoded_len(message)
    }
}

/// ModelInferRequest's routing fields, decoded by prost (so by prost's rules); every
/// other field is skipped as unknown.
#[derive(Clone, PartialEq, prost::Message)]
struct View {
    #[prost(string, tag = "1")]
    model_name: String,
    #[prost(string, tag = "2")]
    model_version: String,
    #[prost(string, tag = "3")]
    id: String,
    #[prost(map = "string, message", tag = "4")]
    parameters: HashMap<String, pb::InferParameter>,
}

/// ModelInferRequest's tensor fields: `inputs` and `raw_input_contents`.
const INPUTS: u32 = 5;
const RAW_INPUT_CONTENTS: u32 = 7;

/// A ModelInferRequest as it came: its bytes, and the fields routing reads.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub bytes: Bytes,
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub parameters: Parameters,
    /// Set by a gateway with auth on: the tenant it authenticated, which it tells the
    /// worker as the `infermesh_tenant` parameter (a worker's response cache keeps each
    /// tenant's answers apart by it). Never read from the client's bytes.
    pub tenant: Option<String>,
}

/// The request parameter a gateway names its authenticated tenant in.
pub const TENANT: &str = "infermesh_tenant";

impl RawRequest {
    pub fn decode(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        let view = <View as prost::Message>::decode(&bytes[..])?;
        Ok(Self {
            bytes,
            model_name: view.model_name,
            model_version: view.model_version,
            id: view.id,
            parameters: view.parameters,
            tenant: None,
        })
    }

    /// The encoded bytes of its tensors (every `inputs` and `raw_input_contents` field,
    /// in order): what makes two requests the same request.
    pub fn tensor_fields(&self) -> impl Iterator<Item = &[u8]> {
        fields(&self.bytes)
            .filter(|(tag, _)| *tag == INPUTS || *tag == RAW_INPUT_CONTENTS)
            .map(|(_, value)| value)
    }
}

/// ModelInferResponse's `id`; ModelStreamInferResponse's `infer_response`.
const ANSWER_ID: u32 = 3;
const INFER_RESPONSE: u32 = 2;

/// A ModelInferResponse as a worker wrote it, to go to the client with `id` (the client's
/// own) written after it, where it replaces the id the worker answered under.
#[derive(Clone, Debug)]
pub struct RawAnswer {
    pub bytes: Bytes,
    pub id: String,
}

impl RawAnswer {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
        // Always written, even empty: it must replace the worker's.
        put_string(ANSWER_ID, &self.id, buf);
    }
}

/// A string field, as prost writes it (written after a message, it replaces the field's
/// earlier value).
pub fn put_string(tag: u32, s: &str, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

/// The bytes [`put_string`] writes.
pub fn string_len(tag: u32, s: &str) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(s.len() as u64) + s.len()
}

impl InferAnswer for RawAnswer {
    type Streamed = RawStreamed;
    fn encoded_len(&self) -> usize {
        self.bytes.len() + string_len(ANSWER_ID, &self.id)
    }
    fn streamed(self) -> RawStreamed {
        RawStreamed::Answer(self)
    }
    fn failed(answer: pb::ModelStreamInferResponse) -> RawStreamed {
        RawStreamed::Failed(Box::new(answer))
    }
    fn streamed_len(message: &RawStreamed) -> usize {
        message.encoded_len()
    }
}

/// A ModelStreamInferResponse of the gateway's: an answer as a worker wrote it, or a
/// failure.
#[derive(Debug)]
pub enum RawStreamed {
    Answer(RawAnswer),
    /// Boxed: rare, and large beside an answer (every queued answer is this size).
    Failed(Box<pb::ModelStreamInferResponse>),
}

impl RawStreamed {
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Answer(a) => {
                let inner = a.encoded_len();
                prost::encoding::key_len(INFER_RESPONSE)
                    + prost::encoding::encoded_len_varint(inner as u64)
                    + inner
            }
            Self::Failed(f) => prost::Message::encoded_len(&**f),
        }
    }

    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        match self {
            Self::Answer(a) => {
                encode_key(INFER_RESPONSE, WireType::LengthDelimited, buf);
                encode_varint(a.encoded_len() as u64, buf);
                a.encode(buf);
                Ok(())
            }
            Self::Failed(f) => prost::Message::encode(&**f, buf),
        }
    }
}

/// The top-level fields of an encoded message, in order: (field number, the bytes of its
/// value — for a length-delimited field, without its length). Ends at the first byte that
/// is not a well-formed field (such a request fails its decode at the worker anyway).
pub fn fields(mut buf: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    std::iter::from_fn(move || next_field(&mut buf))
}

fn next_field<'a>(buf: &mut &'a [u8]) -> Option<(u32, &'a [u8])> {
    let field = parse_field(buf);
    if field.is_none() {
        *buf = &[]; // nothing after a malformed field is read
    }
    field
}

fn parse_field<'a>(buf: &mut &'a [u8]) -> Option<(u32, &'a [u8])> {
    if buf.is_empty() {
        return None;
    }
    let (tag, wire) = decode_key(buf).ok()?;
    let len = match wire {
        WireType::Varint => {
            let start = *buf;
            decode_varint(buf).ok()?;
            let used = start.len() - buf.len();
            *buf = start;
            used
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => usize::try_from(decode_varint(buf).ok()?).ok()?,
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    if len > buf.len() {
        return None;
    }
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Some((tag, value))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn param(s: &str) -> pb::InferParameter {
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(s.into())),
        }
    }

    /// Two messages concatenated are one message with both: the routing view keeps the
    /// last model, version and id and merges the parameters, as a full decode does.
    #[test]
    fn the_view_reads_repeated_fields_as_prost_does() {
        let first = pb::ModelInferRequest {
            model_name: "first".into(),
            model_version: "1".into(),
            id: "a".into(),
            parameters: [("k".to_string(), param("1")), ("j".to_string(), param("x"))].into(),
            raw_input_contents: vec![Bytes::from_static(b"tensor")],
            ..Default::default()
        };
        let second = pb::ModelInferRequest {
            model_name: "second".into(),
            model_version: "2".into(),
            parameters: [("k".to_string(), param("2"))].into(),
            ..Default::default()
        };
        let mut bytes = first.encode_to_vec();
        bytes.extend(second.encode_to_vec());
        let full = pb::ModelInferRequest::decode(&bytes[..]).unwrap();
        let raw = RawRequest::decode(bytes.into()).unwrap();
        assert_eq!(raw.model_name, full.model_name);
        assert_eq!(raw.model_version, full.model_version);
        assert_eq!(raw.id, full.id);
        assert_eq!(raw.parameters, full.parameters);
        assert_eq!(
            (raw.model_name.as_str(), raw.parameters["k"].clone()),
            ("second", param("2"))
        );
        let tensors: Vec<&[u8]> = raw.tensor_fields().collect();
        assert_eq!(tensors, [&b"tensor"[..]]);
    }

    #[test]
    fn an_answer_goes_out_under_the_client_s_id() {
        let worker = pb::ModelInferResponse {
            model_name: "m".into(),
            id: "12".into(),
            raw_output_contents: vec![Bytes::from_static(b"out")],
            ..Default::default()
        };
        let answer = RawAnswer {
            bytes: worker.encode_to_vec().into(),
            id: String::new(),
        };
        let mut unary = Vec::new();
        answer.encode(&mut unary);
        assert_eq!(unary.len(), answer.encoded_len());
        let seen = pb::ModelInferResponse::decode(&unary[..]).unwrap();
        assert_eq!((seen.id.as_str(), seen.model_name.as_str()), ("", "m"));
        assert_eq!(seen.raw_output_contents, worker.raw_output_contents);

        let streamed = answer.streamed();
        let mut buf = Vec::new();
        streamed.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), streamed.encoded_len());
        let seen = pb::ModelStreamInferResponse::decode(&buf[..]).unwrap();
        assert!(seen.error_message.is_empty());
        assert_eq!(seen.infer_response.unwrap().id, "");
    }

    #[test]
    fn truncated_fields_are_an_error_not_a_panic() {
        let bytes = pb::ModelInferRequest {
            raw_input_contents: vec![Bytes::from_static(b"tensor")],
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 0..bytes.len() {
            let _ = fields(&bytes[..cut]).count();
            let _ = RawRequest::decode(Bytes::copy_from_slice(&bytes[..cut]));
        }
    }
}
