//! Request checks against a model's signature. Every message names the input, what was
//! expected and what came.

use infermesh_core::{invalid, tensor::Shape, text::clip, DataType, Error, Tensor, TensorData};
use infermesh_proto::model_infer_request::InferInputTensor;

use super::Signature;
use crate::engine::IoSpec;

fn describe(sig: &Signature, io: &IoSpec) -> String {
    format!("{} {} {:?}", io.name, io.datatype, sig.full_shape(io))
}

/// Checks names, datatypes and shapes before any data is decoded, so the first complaint
/// is about the mismatch a client can fix, not a byte count that follows from it.
/// Returns the request's batch size (1 for models without batching).
pub fn inputs(model: &str, sig: &Signature, tensors: &[InferInputTensor]) -> Result<usize, Error> {
    let expected = || {
        sig.inputs
            .iter()
            .map(|io| describe(sig, io))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if tensors.is_empty() {
        return Err(invalid!(
            "model '{model}': request has no inputs; expected: {}",
            expected()
        ));
    }
    let mut batch: Option<(i64, &str)> = None;
    for t in tensors {
        let Some(io) = sig.inputs.iter().find(|io| io.name == t.name) else {
            return Err(invalid!(
                "model '{model}': unknown input '{}'; expected: {}",
                clip(&t.name),
                expected()
            ));
        };
        if t.datatype != io.datatype.as_str() {
            let what = if DataType::parse(&t.datatype).is_some() {
                "datatype"
            } else {
                "unknown datatype"
            };
            return Err(invalid!(
                "input '{}': {what} '{}'; expected {}",
                t.name,
                clip(&t.datatype),
                io.datatype
            ));
        }
        let full = sig.full_shape(io);
        if t.shape.len() != full.len() {
            return Err(invalid!(
                "input '{}': shape {} has rank {}; expected rank {} ({:?})",
                t.name,
                Shape(&t.shape),
                t.shape.len(),
                full.len(),
                full
            ));
        }
        for (i, (&got, &want)) in t.shape.iter().zip(&full).enumerate() {
            if want >= 0 && got != want {
                return Err(invalid!(
                    "input '{}': dim {i} is {got}; expected {want} (shape {:?}, got {:?})",
                    t.name,
                    full,
                    t.shape
                ));
            }
        }
        if sig.max_batch_size > 0 {
            let b = t.shape[0];
            if b < 1 || b as usize > sig.max_batch_size {
                return Err(invalid!(
                    "input '{}': batch size {b} is outside 1..={} (max_batch_size)",
                    t.name,
                    sig.max_batch_size
                ));
            }
            match batch {
                Some((first, other)) if first != b => {
                    return Err(invalid!(
                    "input '{}': batch size {b} differs from input '{other}' (batch size {first})",
                    t.name
                ))
                }
                _ => batch = Some((b, &t.name)),
            }
        }
    }
    let missing: Vec<String> = sig
        .inputs
        .iter()
        .filter(|io| !tensors.iter().any(|t| t.name == io.name))
        .map(|io| format!("'{}' ({})", io.name, describe(sig, io)))
        .collect();
    if !missing.is_empty() {
        let s = if missing.len() == 1 { "" } else { "s" };
        return Err(invalid!(
            "model '{model}': missing input{s} {}",
            missing.join(", ")
        ));
    }
    Ok(batch.map_or(1, |(b, _)| b as usize))
}

/// The outputs to compute: those asked for, else all, in the model's order.
pub fn outputs(model: &str, sig: &Signature, asked: &[String]) -> Result<Vec<String>, Error> {
    if asked.is_empty() {
        return Ok(sig.outputs.iter().map(|o| o.name.clone()).collect());
    }
    for name in asked {
        if !sig.outputs.iter().any(|o| &o.name == name) {
            let known = sig
                .outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(invalid!(
                "model '{model}': unknown output '{}'; outputs are: {known}",
                clip(name)
            ));
        }
    }
    Ok(asked.to_vec())
}

/// String rules for BYTES inputs of a model whose engine takes text (ONNX string tensors):
/// every element UTF-8 without NUL bytes. Checked here, before the request can join a
/// batch, so one bad string never fails the requests batched with it.
pub fn strings(sig: &Signature, tensors: &[Tensor]) -> Result<(), Error> {
    if !sig.text_strings {
        return Ok(());
    }
    for t in tensors {
        let TensorData::Strings(items) = &t.data else {
            continue;
        };
        for (i, s) in items.iter().enumerate() {
            let name = clip(&t.name);
            if let Err(e) = std::str::from_utf8(s) {
                return Err(invalid!(
                    "input '{name}': BYTES element {i} is not UTF-8 (invalid byte at offset {}); this model's string input needs UTF-8 text",
                    e.valid_up_to()
                ));
            }
            if let Some(at) = s.iter().position(|&b| b == 0) {
                return Err(invalid!(
                    "input '{name}': BYTES element {i} has a NUL byte at offset {at}; this model's string input needs text without NUL"
                ));
            }
        }
    }
    Ok(())
}
