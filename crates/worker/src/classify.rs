//! Triton's classification extension: an output requested with the `classification: N`
//! parameter comes back as its N largest values in each batch row (all of a row's
//! elements), largest first, each the string "VALUE:INDEX" — "VALUE:INDEX:LABEL" when the
//! output has a `label_filename` — as BYTES of shape [batch, N] ([N] unbatched). N beyond
//! a row's elements gives all of them.

use std::collections::HashMap;

use bytes::Bytes;
use infermesh_core::{DataType, Error as RequestError, Tensor, TensorData};
use infermesh_proto::{infer_parameter::ParameterChoice, model_infer_request};

use crate::Error;

pub const PARAMETER: &str = "classification";

/// The outputs asked for as classifications, and how many classes each.
pub fn asked(
    outputs: &[model_infer_request::InferRequestedOutputTensor],
) -> Result<HashMap<String, usize>, Error> {
    let mut out = HashMap::new();
    for o in outputs {
        let Some(p) = o.parameters.get(PARAMETER) else {
            continue;
        };
        let n = match &p.parameter_choice {
            Some(ParameterChoice::Int64Param(n)) if *n > 0 => *n as usize,
            Some(ParameterChoice::Uint64Param(n)) if *n > 0 => *n as usize,
            other => {
                return Err(RequestError::InvalidArgument(format!(
                    "output '{}' parameter 'classification': expected a positive integer, found {other:?}",
                    o.name
                ))
                .into())
            }
        };
        out.insert(o.name.clone(), n);
    }
    Ok(out)
}

/// `t` as its top `n` classes per row (`batched`: the first dim is the batch).
pub fn classify(
    t: &Tensor,
    n: usize,
    batched: bool,
    labels: Option<&[String]>,
) -> Result<Tensor, Error> {
    let values = numbers(t).ok_or_else(|| {
        RequestError::InvalidArgument(format!(
            "output '{}' parameter 'classification': the output is {}, not numbers",
            t.name, t.datatype
        ))
    })?;
    let rows = match (batched, t.shape.first()) {
        (true, Some(&b)) if b > 0 => b as usize,
        _ => 1,
    };
    let per_row = values.len() / rows.max(1);
    let k = n.min(per_row);
    let mut strings = Vec::with_capacity(rows * k);
    for row in values.chunks(per_row.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Largest first; ties keep the lower index first, as a stable sort does.
        order.sort_by(|&a, &b| row[b].0.total_cmp(&row[a].0));
        for &i in order.iter().take(k) {
            let mut s = format!("{}:{i}", row[i].1);
            if let Some(label) = labels.and_then(|l| l.get(i)) {
                s.push(':');
                s.push_str(label);
            }
            strings.push(Bytes::from(s));
        }
    }
    Ok(Tensor {
        name: t.name.clone(),
        datatype: DataType::Bytes,
        shape: match batched {
            true => vec![rows as i64, k as i64],
            false => vec![k as i64],
        },
        data: TensorData::Strings(strings),
    })
}

/// Each element as a number to rank by and the text Triton writes for it (floats with six
/// decimals, integers as they are).
fn numbers(t: &Tensor) -> Option<Vec<(f64, String)>> {
    let TensorData::Fixed(b) = &t.data else {
        return None;
    };
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> (f64, String)) -> Vec<(f64, String)> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk size")))
            .collect()
    }
    let float = |v: f64| (v, format!("{v:.6}"));
    Some(match t.datatype {
        DataType::F32 => each(b, |c: [u8; 4]| float(f32::from_le_bytes(c) as f64)),
        DataType::F64 => each(b, |c: [u8; 8]| float(f64::from_le_bytes(c))),
        DataType::F16 => each(b, |c: [u8; 2]| float(half::f16::from_le_bytes(c).to_f64())),
        DataType::BF16 => each(b, |c: [u8; 2]| float(half::bf16::from_le_bytes(c).to_f64())),
        DataType::I8 => each(b, |c: [u8; 1]| int(i8::from_le_bytes(c) as i64)),
        DataType::I16 => each(b, |c: [u8; 2]| int(i16::from_le_bytes(c) as i64)),
        DataType::I32 => each(b, |c: [u8; 4]| int(i32::from_le_bytes(c) as i64)),
        DataType::I64 => each(b, |c: [u8; 8]| int(i64::from_le_bytes(c))),
        DataType::U8 => each(b, |c: [u8; 1]| int(c[0] as i64)),
        DataType::U16 => each(b, |c: [u8; 2]| int(u16::from_le_bytes(c) as i64)),
        DataType::U32 => each(b, |c: [u8; 4]| int(u32::from_le_bytes(c) as i64)),
        DataType::U64 => each(b, |c: [u8; 8]| {
            let v = u64::from_le_bytes(c);
            (v as f64, v.to_string())
        }),
        DataType::Bool => each(b, |c: [u8; 1]| int(c[0] as i64)),
        DataType::Bytes => return None,
    })
}

fn int(v: i64) -> (f64, String) {
    (v as f64, v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(shape: Vec<i64>, v: &[f32]) -> Tensor {
        Tensor {
            name: "p".into(),
            datatype: DataType::F32,
            shape,
            data: TensorData::Fixed(
                v.iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<_>>()
                    .into(),
            ),
        }
    }

    fn strings(t: &Tensor) -> Vec<String> {
        match &t.data {
            TensorData::Strings(s) => s
                .iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
                .collect(),
            _ => panic!("not strings"),
        }
    }

    #[test]
    fn the_top_classes_of_each_row_largest_first() {
        let t = floats(vec![2, 3], &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25]);
        let c = classify(&t, 2, true, None).unwrap();
        assert_eq!(c.shape, vec![2, 2]);
        assert_eq!(
            strings(&c),
            ["0.700000:1", "0.200000:2", "0.500000:0", "0.250000:1"]
        );
        let labels = ["cat".to_string(), "dog".into(), "emu".into()];
        let c = classify(&floats(vec![3], &[0.1, 0.7, 0.2]), 5, false, Some(&labels)).unwrap();
        assert_eq!(c.shape, vec![3]);
        assert_eq!(
            strings(&c),
            ["0.700000:1:dog", "0.200000:2:emu", "0.100000:0:cat"]
        );
    }

    #[test]
    fn a_bad_count_names_the_output() {
        let o = model_infer_request::InferRequestedOutputTensor {
            name: "p".into(),
            parameters: [(
                PARAMETER.to_string(),
                infermesh_proto::InferParameter {
                    parameter_choice: Some(ParameterChoice::StringParam("3".into())),
                },
            )]
            .into(),
        };
        let e = Status::from(asked(&[o]).unwrap_err());
        assert!(
            e.message()
                .contains("output 'p' parameter 'classification'"),
            "{e:?}"
        );
    }

    use tonic::Status;
}
