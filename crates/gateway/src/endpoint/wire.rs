//! What goes on a worker's stream, written straight from the caller's request: the request
//! is shared by every attempt (never copied) and encoded as it is, followed by what the
//! gateway adds — its own id, the version chosen, its parameters. Protobuf reads the last
//! value of a singular field and merges map entries by key, so the worker sees the
//! gateway's values, exactly as if the request had been copied and changed.

use std::{collections::HashMap, sync::Arc};

use bytes::BufMut;
use infermesh_core::stream::{CANCEL, UNORDERED};
use infermesh_proto as pb;
use pb::infer_parameter::ParameterChoice;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, message, WireType};
use tonic::{
    codec::{Codec as TonicCodec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Status,
};

/// ModelInferRequest's field numbers (grpc_service.proto).
const MODEL_VERSION: u32 = 2;
const ID: u32 = 3;
const PARAMETERS: u32 = 4;

/// One message for a worker's stream.
pub enum Outgoing {
    /// `req` under the gateway's `id`, at `version`, unordered, with `timeout` (µs, what
    /// is left of its deadline) and `trace` (the trace context, when there is one).
    Request {
        req: Arc<pb::ModelInferRequest>,
        id: u64,
        version: i64,
        timeout: Option<i64>,
        trace: HashMap<String, pb::InferParameter>,
    },
    /// Cancels the message sent under `id`, if it has not run.
    Cancel(u64),
}

impl Outgoing {
    fn encode(&self, buf: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        let mut digits = [0u8; 20];
        match self {
            Self::Request {
                req,
                id,
                version,
                timeout,
                trace,
            } => {
                prost::Message::encode(&**req, buf)?;
                // Versions are positive (the route parsed them as such).
                put_str(
                    MODEL_VERSION,
                    decimal(version.unsigned_abs(), &mut digits),
                    buf,
                );
                put_str(ID, decimal(*id, &mut digits), buf);
                parameter(UNORDERED, ParameterChoice::BoolParam(true), buf);
                if let Some(us) = timeout {
                    parameter("timeout", ParameterChoice::Int64Param(*us), buf);
                }
                for (key, value) in trace {
                    if let Some(choice) = &value.parameter_choice {
                        parameter(key, choice.clone(), buf);
                    }
                }
            }
            Self::Cancel(id) => {
                put_str(ID, decimal(*id, &mut digits), buf);
                parameter(CANCEL, ParameterChoice::BoolParam(true), buf);
            }
        }
        Ok(())
    }
}

/// A string field, as prost writes it.
fn put_str(tag: u32, s: &str, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

fn str_len(tag: u32, s: &str) -> usize {
    key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
}

/// One entry of the request's `parameters` map, as prost writes it.
fn parameter(key: &str, choice: ParameterChoice, buf: &mut impl BufMut) {
    let value = pb::InferParameter {
        parameter_choice: Some(choice),
    };
    let len = str_len(1, key) + message::encoded_len(2, &value);
    encode_key(PARAMETERS, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    put_str(1, key, buf);
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

/// The codec of the gateway's streams to workers: [`Outgoing`] out, answers in (prost's,
/// as every generated client).
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

pub struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message for a worker: {e}")))
    }
}

impl TonicCodec for Codec {
    type Encode = Outgoing;
    type Decode = pb::ModelStreamInferResponse;
    type Encoder = OutgoingEncoder;
    type Decoder = AnswerDecoder;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> AnswerDecoder {
        AnswerDecoder(pb::codec::Codec::<(), pb::ModelStreamInferResponse>::default().decoder())
    }
}

pub struct AnswerDecoder(pb::codec::ClientErrorDecoder<pb::ModelStreamInferResponse>);

impl Decoder for AnswerDecoder {
    type Item = pb::ModelStreamInferResponse;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf)
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
        let out = Outgoing::Request {
            req: Arc::new(req.clone()),
            id: 1234567890123,
            version: 12,
            timeout: Some(500),
            trace,
        };
        let mut buf = Vec::new();
        out.encode(&mut buf).unwrap();
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
        Outgoing::Cancel(0).encode(&mut buf).unwrap();
        let cancel = pb::ModelInferRequest::decode(&buf[..]).unwrap();
        assert_eq!(cancel.id, "0");
        assert_eq!(
            cancel.parameters[CANCEL],
            param(ParameterChoice::BoolParam(true))
        );
    }
}
