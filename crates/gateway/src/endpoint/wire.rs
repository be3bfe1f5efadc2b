//! The gateway's side of the wire to workers. A request goes out as the bytes it came in,
//! shared by every attempt (never copied into a message or re-encoded), followed by what
//! the gateway adds — its own id, the version chosen, its parameters. Protobuf reads the
//! last value of a singular field and merges map entries by key, so the worker sees the
//! gateway's values, exactly as if the request had been decoded, changed and re-encoded.
//! An answer comes back as bytes too: only its id (and, for a failure, its status
//! parameters) are read; its tensors go on to the client untouched.

use std::{collections::HashMap, sync::Arc};

use bytes::{Buf, BufMut, Bytes};
use infermesh_core::{
    raw::{put_string, string_len, RawRequest, TENANT},
    reason,
    stream::{CANCEL, STATUS_CODE, UNORDERED},
    Reason,
};
use infermesh_proto as pb;
use pb::infer_parameter::ParameterChoice;
use prost::encoding::{encode_key, encode_varint, message, WireType};
use tonic::{
    codec::{Codec as TonicCodec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

/// ModelInferRequest's field numbers (grpc_service.proto).
const MODEL_VERSION: u32 = 2;
const ID: u32 = 3;
const PARAMETERS: u32 = 4;

/// One message for a worker.
pub enum Outgoing {
    /// On a stream: `req` under the gateway's `id`, at `version`, unordered, with
    /// `timeout` (µs, what is left of its deadline) and `trace` (the trace context, when
    /// there is one).
    Request {
        req: Arc<RawRequest>,
        id: u64,
        version: i64,
        timeout: Option<i64>,
        trace: HashMap<String, pb::InferParameter>,
    },
    /// On a stream: cancels the message sent under `id`, if it has not run.
    Cancel(u64),
    /// A unary call: `req` at `version` (its id is the client's; deadline and trace
    /// travel in metadata).
    Unary { req: Arc<RawRequest>, version: i64 },
}

impl Outgoing {
    fn encode(&self, buf: &mut impl BufMut) {
        let mut digits = [0u8; 20];
        match self {
            Self::Request {
                req,
                id,
                version,
                timeout,
                trace,
            } => {
                buf.put_slice(&req.bytes);
                // Versions are positive (the route parsed them as such).
                put_string(
                    MODEL_VERSION,
                    decimal(version.unsigned_abs(), &mut digits),
                    buf,
                );
                put_string(ID, decimal(*id, &mut digits), buf);
                parameter(UNORDERED, ParameterChoice::BoolParam(true), buf);
                if let Some(us) = timeout {
                    parameter("timeout", ParameterChoice::Int64Param(*us), buf);
                }
                for (key, value) in trace {
                    if let Some(choice) = &value.parameter_choice {
                        parameter(key, choice.clone(), buf);
                    }
                }
                tenant(req, buf);
            }
            Self::Cancel(id) => {
                put_string(ID, decimal(*id, &mut digits), buf);
                parameter(CANCEL, ParameterChoice::BoolParam(true), buf);
            }
            Self::Unary { req, version } => {
                buf.put_slice(&req.bytes);
                put_string(
                    MODEL_VERSION,
                    decimal(version.unsigned_abs(), &mut digits),
                    buf,
                );
                tenant(req, buf);
            }
        }
    }
}

/// The tenant the gateway authenticated, for the worker (a client cannot set it: the
/// gateway refuses `infermesh_` parameters from clients).
fn tenant(req: &RawRequest, buf: &mut impl BufMut) {
    if let Some(t) = &req.tenant {
        parameter(TENANT, ParameterChoice::StringParam(t.clone()), buf);
    }
}

/// One entry of the request's `parameters` map, as prost writes it.
fn parameter(key: &str, choice: ParameterChoice, buf: &mut impl BufMut) {
    let value = pb::InferParameter {
        parameter_choice: Some(choice),
    };
    let len = string_len(1, key) + message::encoded_len(2, &value);
    encode_key(PARAMETERS, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    put_string(1, key, buf);
    message::encode(2, &value, buf);
}

/// `n`'s decimal digits, written into `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

/// A worker's answer to one message on a stream, read only as far as delivering it needs.
pub struct Delivered {
    /// The gateway's id it answers (none: not one of ours).
    pub id: Option<u64>,
    pub answer: Result<Bytes, Status>,
}

/// ModelStreamInferResponse, its answer left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct StreamAnswer {
    #[prost(string, tag = "1")]
    error_message: String,
    #[prost(bytes = "bytes", tag = "2")]
    infer_response: Bytes,
}

/// What the gateway reads of a ModelInferResponse: the id, and the parameters that carry
/// a failure's code and reason.
#[derive(Clone, PartialEq, prost::Message)]
struct AnswerView {
    #[prost(string, tag = "3")]
    id: String,
    #[prost(map = "string, message", tag = "4")]
    parameters: HashMap<String, pb::InferParameter>,
}

impl Delivered {
    fn decode(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        let outer = <StreamAnswer as prost::Message>::decode(bytes)?;
        let mut view = <AnswerView as prost::Message>::decode(&outer.infer_response[..])?;
        let id = view.id.parse().ok();
        if outer.error_message.is_empty() {
            return Ok(Self {
                id,
                answer: Ok(outer.infer_response),
            });
        }
        let code = match view.parameters.remove(STATUS_CODE) {
            Some(pb::InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(code)),
            }) => Code::from(code as i32),
            _ => Code::Unknown,
        };
        // The worker's reason travels on, in the status details as on a unary call.
        let reason = match view.parameters.remove(reason::PARAM) {
            Some(pb::InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(r)),
            }) => Reason::parse(&r),
            _ => None,
        };
        let status = match reason {
            Some(reason) => reason::status(code, outer.error_message, reason),
            None => Status::new(code, outer.error_message),
        };
        Ok(Self {
            id,
            answer: Err(status),
        })
    }
}

/// The codec of the gateway's calls to workers: [`Outgoing`] out; answers in, as
/// [`Delivered`] on a stream and as bytes from a unary call.
pub struct Codec<D>(std::marker::PhantomData<D>);

impl<D> Default for Codec<D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

pub struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf);
        Ok(())
    }
}

/// How an answer is read from a whole message's bytes.
pub trait Read: Sized + Send + 'static {
    fn read(bytes: Bytes) -> Result<Self, prost::DecodeError>;
}

impl Read for Delivered {
    fn read(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }
}

/// A unary call's ModelInferResponse, as it came.
impl Read for Bytes {
    fn read(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        Ok(bytes)
    }
}

pub struct AnswerDecoder<D>(std::marker::PhantomData<D>);

impl<D: Read> Decoder for AnswerDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        D::read(bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("a worker's answer is not a valid message: {e}")))
    }
}

impl<D: Read> TonicCodec for Codec<D> {
    type Encode = Outgoing;
    type Decode = D;
    type Encoder = OutgoingEncoder;
    type Decoder = AnswerDecoder<D>;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> AnswerDecoder<D> {
        AnswerDecoder(std::marker::PhantomData)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn param(choice: ParameterChoice) -> pb::InferParameter {
        pb::InferParameter {
            parameter_choice: Some(choice),
        }
    }

    /// What the worker decodes is the request with the gateway's id, version and
    /// parameters in place of the client's, tensors untouched.
    #[test]
    fn the_worker_reads_the_gateway_s_values_over_the_client_s() {
        let req = pb::ModelInferRequest {
            model_name: "m".into(),
            model_version: "7".into(),
            id: "the-client's".into(),
            parameters: [
                (
                    "timeout".to_string(),
                    param(ParameterChoice::Int64Param(9_000_000)),
                ),
                (
                    "mine".to_string(),
                    param(ParameterChoice::StringParam("kept".into())),
                ),
            ]
            .into(),
            raw_input_contents: vec![bytes::Bytes::from_static(b"\x01\x02\x03\x04")],
            ..Default::default()
        };
        let trace = [(
            "traceparent".to_string(),
            param(ParameterChoice::StringParam("00-abc-def-01".into())),
        )]
        .into();
        let raw = RawRequest::decode(req.encode_to_vec().into()).unwrap();
        let out = Outgoing::Request {
            req: Arc::new(raw),
            id: 1234567890123,
            version: 12,
            timeout: Some(500),
            trace,
        };
        let mut buf = Vec::new();
        out.encode(&mut buf);
        let seen = pb::ModelInferRequest::decode(&buf[..]).unwrap();
        let mut want = req;
        want.model_version = "12".into();
        want.id = "1234567890123".into();
        want.parameters
            .insert(UNORDERED.into(), param(ParameterChoice::BoolParam(true)));
        want.parameters
            .insert("timeout".into(), param(ParameterChoice::Int64Param(500)));
        want.parameters.insert(
            "traceparent".into(),
            param(ParameterChoice::StringParam("00-abc-def-01".into())),
        );
        assert_eq!(seen, want);

        let mut buf = Vec::new();
        Outgoing::Cancel(0).encode(&mut buf);
        let cancel = pb::ModelInferRequest::decode(&buf[..]).unwrap();
        assert_eq!(cancel.id, "0");
        assert_eq!(
            cancel.parameters[CANCEL],
            param(ParameterChoice::BoolParam(true))
        );
    }
}
