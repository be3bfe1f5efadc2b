//! The cache key: everything that decides an answer, written as one unambiguous byte
//! stream (every piece length-prefixed, maps in key order) and digested twice by two hash
//! functions of unrelated designs — BLAKE3 names the entry, SHA-256 confirms a hit. Two
//! different requests collide only if both digests collide at once.
//!
//! In the stream: the scope (the caller's tenant and the tenant a gateway names, unless
//! the model shares its cache), the model, its version and load generation, each input's
//! name, datatype, shape, parameters and bytes (raw or typed), each requested output with
//! its parameters, and every request parameter except those that cannot change an answer
//! (deadline, priority, the id, tracing and the mesh's own bookkeeping).

use std::collections::HashMap;

use infermesh_proto as pb;
use prost::Message;
use ring::digest::{Context, SHA256};

/// The request parameter a gateway sets to the tenant it authenticated, so a worker
/// behind it keeps each tenant's entries apart.
pub use infermesh_core::raw::TENANT;

/// Request parameters that never change an answer.
const NEUTRAL: &[&str] = &[
    "timeout",
    "priority",
    "traceparent",
    "tracestate",
    TENANT,
    infermesh_core::stream::UNORDERED,
    infermesh_core::stream::CANCEL,
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub id: [u8; 32],
    pub check: [u8; 32],
}

/// Who may share entries: `caller` is the tenant this worker authenticated, `via` the one a
/// gateway names. Both empty when the model's cache is shared.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope<'a> {
    pub caller: &'a str,
    pub via: &'a str,
}

impl<'a> Scope<'a> {
    /// The request's scope: the authenticated caller's tenant, and the tenant a gateway
    /// named in the request.
    pub fn of(caller: Option<&'a str>, req: &'a pb::ModelInferRequest) -> Self {
        use pb::infer_parameter::ParameterChoice;
        let via = match req
            .parameters
            .get(TENANT)
            .and_then(|p| p.parameter_choice.as_ref())
        {
            Some(ParameterChoice::StringParam(s)) => s.as_str(),
            _ => "",
        };
        Self {
            caller: caller.unwrap_or(""),
            via,
        }
    }
}

/// Which model version answers: its name, version and load generation.
pub struct Version<'a> {
    pub name: &'a str,
    pub version: i64,
    pub generation: u64,
}

pub fn of(req: &pb::ModelInferRequest, model: &Version<'_>, scope: Scope<'_>) -> Key {
    let mut w = Writer::new();
    w.bytes(b"infermesh response cache 1");
    w.bytes(scope.caller.as_bytes());
    w.bytes(scope.via.as_bytes());
    w.bytes(model.name.as_bytes());
    w.u64(model.version as u64);
    w.u64(model.generation);
    w.u64(req.inputs.len() as u64);
    for (i, input) in req.inputs.iter().enumerate() {
        w.bytes(input.name.as_bytes());
        w.bytes(input.datatype.as_bytes());
        w.u64(input.shape.len() as u64);
        for d in &input.shape {
            w.u64(*d as u64);
        }
        w.parameters(&input.parameters, &[]);
        match req.raw_input_contents.get(i) {
            Some(raw) => {
                w.u64(1);
                w.bytes(raw);
            }
            None => {
                w.u64(2);
                let typed = input.contents.as_ref().map(Message::encode_to_vec);
                w.bytes(&typed.unwrap_or_default());
            }
        }
    }
    // Raw contents beyond the inputs make the request invalid; counted all the same.
    w.u64(req.raw_input_contents.len() as u64);
    w.u64(req.outputs.len() as u64);
    for output in &req.outputs {
        w.bytes(output.name.as_bytes());
        w.parameters(&output.parameters, &[]);
    }
    w.parameters(&req.parameters, NEUTRAL);
    w.finish()
}

struct Writer {
    id: blake3::Hasher,
    check: Context,
}

impl Writer {
    fn new() -> Self {
        Self {
            id: blake3::Hasher::new(),
            check: Context::new(&SHA256),
        }
    }

    fn raw(&mut self, b: &[u8]) {
        self.id.update(b);
        self.check.update(b);
    }

    fn u64(&mut self, n: u64) {
        self.raw(&n.to_le_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.raw(b);
    }

    /// A parameter map in key order, `skip` left out.
    fn parameters(&mut self, params: &HashMap<String, pb::InferParameter>, skip: &[&str]) {
        let mut keys: Vec<&String> = params
            .keys()
            .filter(|k| !skip.contains(&k.as_str()))
            .collect();
        keys.sort();
        self.u64(keys.len() as u64);
        for k in keys {
            self.bytes(k.as_bytes());
            self.bytes(&params[k].encode_to_vec());
        }
    }

    fn finish(self) -> Key {
        let mut key = Key {
            id: *self.id.finalize().as_bytes(),
            check: [0; 32],
        };
        key.check.copy_from_slice(self.check.finish().as_ref());
        key
    }
}
