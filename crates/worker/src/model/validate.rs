//! Request checks against a model's signature. Every message names the input, what was
//! expected and what came.

use infermesh_core::{invalid, DataType, Error};
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
                t.name,
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
                t.datatype,
                io.datatype
            ));
        }
        let full = sig.full_shape(io);
        if t.shape.len() != full.len() {
            return Err(invalid!(
                "input '{}': shape {:?} has rank {}; expected rank {} ({:?})",
                t.name,
                t.shape,
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
    if let Some(missing) = sig
        .inputs
        .iter()
        .find(|io| !tensors.iter().any(|t| t.name == io.name))
    {
        return Err(invalid!(
            "model '{model}': missing input '{}' ({})",
            missing.name,
            describe(sig, missing)
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
                "model '{model}': unknown output '{name}'; outputs are: {known}"
            ));
        }
    }
    Ok(asked.to_vec())
}
