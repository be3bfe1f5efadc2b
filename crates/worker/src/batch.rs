//! Joining requests along dim 0 and splitting outputs back, without copying where it can
//! be avoided: outputs are split as `Bytes` slices of one buffer.

use bytes::BytesMut;
use infermesh_core::{Tensor, TensorData};

/// Joins the inputs of several requests (same input names and non-batch dims, checked by
/// the scheduler) into one batch, in the first request's input order.
pub fn concat(requests: &[&[Tensor]]) -> Vec<Tensor> {
    let first = requests[0];
    first
        .iter()
        .map(|t0| {
            let parts: Vec<&Tensor> = requests
                .iter()
                .map(|inputs| {
                    inputs
                        .iter()
                        .find(|t| t.name == t0.name)
                        .expect("same inputs")
                })
                .collect();
            let rows: i64 = parts.iter().map(|t| t.shape[0]).sum();
            let mut shape = t0.shape.clone();
            shape[0] = rows;
            let data = match &t0.data {
                TensorData::Fixed(_) => {
                    let len = parts.iter().map(|t| fixed(t).len()).sum();
                    let mut buf = BytesMut::with_capacity(len);
                    parts.iter().for_each(|t| buf.extend_from_slice(fixed(t)));
                    TensorData::Fixed(buf.freeze())
                }
                TensorData::Strings(_) => TensorData::Strings(
                    parts
                        .iter()
                        .flat_map(|t| match &t.data {
                            TensorData::Strings(s) => s.iter().cloned(),
                            TensorData::Fixed(_) => unreachable!("same datatype"),
                        })
                        .collect(),
                ),
            };
            Tensor {
                name: t0.name.clone(),
                datatype: t0.datatype,
                shape,
                data,
            }
        })
        .collect()
}

fn fixed(t: &Tensor) -> &[u8] {
    match &t.data {
        TensorData::Fixed(b) => b,
        TensorData::Strings(_) => unreachable!("same datatype"),
    }
}

/// Splits batch outputs into one list per request, `rows[i]` rows each.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    let total: usize = rows.iter().sum();
    let mut per_request: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        if out.shape.first().copied() != Some(total as i64) {
            return Err(format!(
                "output '{}' has shape {:?}; a batch of {total} rows needs {total} first",
                out.name, out.shape
            ));
        }
        let per_row = out.element_count() / total.max(1);
        // An engine's output must hold whole rows: slicing trusts this below.
        let exact = match &out.data {
            TensorData::Fixed(b) => per_row * total * out.datatype.size().unwrap_or(1) == b.len(),
            TensorData::Strings(s) => per_row * total == s.len(),
        };
        if !exact {
            return Err(format!(
                "output '{}' has shape {:?} but {} elements; not {total} whole rows",
                out.name,
                out.shape,
                out.element_count()
            ));
        }
        let mut at = 0usize;
        for (i, &n) in rows.iter().enumerate() {
            let mut shape = out.shape.clone();
            shape[0] = n as i64;
            let data = match &out.data {
                TensorData::Fixed(b) => {
                    let size = out.datatype.size().unwrap_or(1);
                    TensorData::Fixed(b.slice(at * per_row * size..(at + n) * per_row * size))
                }
                TensorData::Strings(s) => {
                    TensorData::Strings(s[at * per_row..(at + n) * per_row].to_vec())
                }
            };
            per_request[i].push(Tensor {
                name: out.name.clone(),
                datatype: out.datatype,
                shape,
                data,
            });
            at += n;
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use infermesh_core::DataType;

    use super::*;

    fn t(name: &str, rows: i64, data: &[u8]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::U8,
            shape: vec![rows, 2],
            data: TensorData::Fixed(Bytes::copy_from_slice(data)),
        }
    }

    #[test]
    fn concat_then_split_gives_back_each_request() {
        let a = vec![t("x", 1, &[1, 2]), t("y", 1, &[9, 9])];
        let b = vec![t("y", 2, &[7, 7, 8, 8]), t("x", 2, &[3, 4, 5, 6])];
        let joined = concat(&[&a, &b]);
        assert_eq!(joined[0], t("x", 3, &[1, 2, 3, 4, 5, 6]));
        assert_eq!(joined[1], t("y", 3, &[9, 9, 7, 7, 8, 8]));
        let parts = split(joined, &[1, 2]).unwrap();
        assert_eq!(parts[0], a);
        assert_eq!(
            parts[1],
            vec![t("x", 2, &[3, 4, 5, 6]), t("y", 2, &[7, 7, 8, 8])]
        );
    }

    #[test]
    fn split_rejects_outputs_without_the_batch_dim() {
        let err = split(vec![t("x", 2, &[1, 2, 3, 4])], &[1, 2]).unwrap_err();
        assert!(err.contains("output 'x'"), "{err}");
    }
}
