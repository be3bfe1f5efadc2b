//! Comparing a shadow's answer with the primary's, output tensor by output tensor
//! (matched by name): for float outputs (FP16, BF16, FP32, FP64) the max absolute and
//! relative error and the cosine similarity, and for classification-shaped ones (last
//! dimension > 1) how often the argmax changed; integer, BOOL and BYTES outputs must be
//! equal. The answers agree when every float element is within `atol + rtol·|primary|`
//! (NaN agrees with NaN only) and every other output is equal.

use infermesh_core::{
    tensor::{Tensor, TensorData},
    DataType,
};
use infermesh_proto::ModelInferResponse;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Agree,
    Disagree,
    /// The answers cannot be compared: an output missing or extra, another datatype or
    /// shape, undecodable contents.
    Error(String),
}

/// One comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub outcome: Outcome,
    /// Over every float output.
    pub max_abs: f64,
    pub max_rel: f64,
    /// The lowest cosine similarity of a float output (None: no float output).
    pub cosine: Option<f64>,
    /// The output with the largest absolute error (or the first unequal one).
    pub worst: Option<String>,
    /// (rows whose argmax changed, rows compared), over classification-shaped outputs.
    pub argmax: (u64, u64),
}

impl Comparison {
    fn error(why: String) -> Self {
        Self {
            outcome: Outcome::Error(why),
            max_abs: 0.0,
            max_rel: 0.0,
            cosine: None,
            worst: None,
            argmax: (0, 0),
        }
    }
}

/// The outputs of an answer, decoded (raw contents, or typed ones).
fn outputs(answer: &ModelInferResponse, whose: &str) -> Result<Vec<Tensor>, String> {
    let raw = &answer.raw_output_contents;
    answer
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let raw = (!raw.is_empty()).then(|| raw.get(i)).flatten();
            Tensor::decode_output(o, raw).map_err(|e| format!("{whose}: {e}"))
        })
        .collect()
}

pub fn compare(
    primary: &ModelInferResponse,
    shadow: &ModelInferResponse,
    tol: Tolerance,
) -> Comparison {
    let (p, s) = match (
        outputs(primary, "the primary's answer"),
        outputs(shadow, "the shadow's answer"),
    ) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) | (_, Err(e)) => return Comparison::error(e),
    };
    if let Some(extra) = s.iter().find(|t| !p.iter().any(|q| q.name == t.name)) {
        return Comparison::error(format!(
            "the shadow's answer has an output '{}' the primary's has not",
            extra.name
        ));
    }
    let mut c = Comparison {
        outcome: Outcome::Agree,
        max_abs: 0.0,
        max_rel: 0.0,
        cosine: None,
        worst: None,
        argmax: (0, 0),
    };
    let mut worst_abs = -1.0;
    for a in &p {
        let Some(b) = s.iter().find(|t| t.name == a.name) else {
            return Comparison::error(format!(
                "output '{}' is missing from the shadow's answer",
                a.name
            ));
        };
        if a.datatype != b.datatype || a.shape != b.shape {
            return Comparison::error(format!(
                "output '{}': the primary's is {} {:?}, the shadow's {} {:?}",
                a.name, a.datatype, a.shape, b.datatype, b.shape
            ));
        }
        match (floats(a), floats(b)) {
            (Some(x), Some(y)) => {
                let o = float_output(&x, &y, tol);
                c.max_abs = c.max_abs.max(o.max_abs);
                c.max_rel = c.max_rel.max(o.max_rel);
                c.cosine = Some(c.cosine.map_or(o.cosine, |v: f64| v.min(o.cosine)));
                if o.max_abs > worst_abs {
                    worst_abs = o.max_abs;
                    if !o.within || c.worst.is_none() {
                        c.worst = Some(a.name.clone());
                    }
                }
                if !o.within {
                    c.outcome = Outcome::Disagree;
                }
                let row = a.shape.last().copied().unwrap_or(0);
                if row > 1 && x.len() % row as usize == 0 {
                    let (changed, rows) = argmax_changed(&x, &y, row as usize);
                    c.argmax.0 += changed;
                    c.argmax.1 += rows;
                }
            }
            _ if a.data != b.data => {
                c.outcome = Outcome::Disagree;
                c.worst.get_or_insert_with(|| a.name.clone());
            }
            _ => {}
        }
    }
    c
}

struct FloatOutput {
    max_abs: f64,
    max_rel: f64,
    cosine: f64,
    within: bool,
}

fn float_output(x: &[f64], y: &[f64], tol: Tolerance) -> FloatOutput {
    let (mut max_abs, mut max_rel, mut within) = (0.0f64, 0.0f64, true);
    let (mut dot, mut nx, mut ny) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        if a.is_nan() || b.is_nan() {
            if a.is_nan() != b.is_nan() {
                within = false;
                max_abs = f64::INFINITY;
            }
            continue;
        }
        let d = if a == b { 0.0 } else { (a - b).abs() };
        max_abs = max_abs.max(d);
        if a.abs() > 0.0 {
            max_rel = max_rel.max(d / a.abs());
        } else if d > 0.0 {
            max_rel = f64::INFINITY;
        }
        if d > tol.atol + tol.rtol * a.abs() {
            within = false;
        }
        dot += a * b;
        nx += a * a;
        ny += b * b;
    }
    let cosine = if nx == 0.0 && ny == 0.0 {
        1.0
    } else if nx == 0.0 || ny == 0.0 {
        0.0
    } else {
        dot / (nx.sqrt() * ny.sqrt())
    };
    FloatOutput {
        max_abs,
        max_rel,
        cosine,
        within,
    }
}

/// (rows whose argmax differs, rows) for `row`-wide rows.
fn argmax_changed(x: &[f64], y: &[f64], row: usize) -> (u64, u64) {
    let argmax = |v: &[f64]| {
        v.iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (i, &e)| {
                if e > best.1 {
                    (i, e)
                } else {
                    best
                }
            })
            .0
    };
    let rows = x.len() / row;
    let changed = x
        .chunks(row)
        .zip(y.chunks(row))
        .filter(|(a, b)| argmax(a) != argmax(b))
        .count();
    (changed as u64, rows as u64)
}

/// A float tensor's elements as f64 (None for other datatypes).
fn floats(t: &Tensor) -> Option<Vec<f64>> {
    let TensorData::Fixed(b) = &t.data else {
        return None;
    };
    Some(match t.datatype {
        DataType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect(),
        DataType::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        DataType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DataType::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use infermesh_proto::model_infer_response::InferOutputTensor;

    use super::*;

    fn answer(outputs: &[(&str, &str, Vec<i64>, Vec<u8>)]) -> ModelInferResponse {
        ModelInferResponse {
            outputs: outputs
                .iter()
                .map(|(n, d, s, _)| InferOutputTensor {
                    name: n.to_string(),
                    datatype: d.to_string(),
                    shape: s.clone(),
                    ..Default::default()
                })
                .collect(),
            raw_output_contents: outputs.iter().map(|o| Bytes::from(o.3.clone())).collect(),
            ..Default::default()
        }
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    const TOL: Tolerance = Tolerance {
        atol: 1e-4,
        rtol: 1e-3,
    };

    #[test]
    fn identical_answers_agree_and_a_shift_is_measured() {
        let p = answer(&[
            (
                "probs",
                "FP32",
                vec![2, 3],
                f32s(&[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]),
            ),
            ("label", "INT64", vec![2], vec![1; 16]),
        ]);
        let c = compare(&p, &p, TOL);
        assert_eq!(
            (c.outcome.clone(), c.max_abs, c.argmax),
            (Outcome::Agree, 0.0, (0, 2))
        );
        assert!((c.cosine.unwrap() - 1.0).abs() < 1e-12);
        // A known constant on every element: the max absolute error is that constant, and
        // the argmax of the second row changes (0.5 + 0 vs 0.3 + 0.25).
        let s = answer(&[
            (
                "probs",
                "FP32",
                vec![2, 3],
                f32s(&[0.1, 0.7, 0.2, 0.5, 0.55, 0.2]),
            ),
            ("label", "INT64", vec![2], vec![1; 16]),
        ]);
        let c = compare(&p, &s, TOL);
        assert_eq!(c.outcome, Outcome::Disagree);
        assert!((c.max_abs - 0.25).abs() < 1e-6, "{}", c.max_abs);
        assert_eq!((c.worst.as_deref(), c.argmax), (Some("probs"), (1, 2)));
        // Within the tolerance: agrees, the error still measured.
        let s = answer(&[
            (
                "probs",
                "FP32",
                vec![2, 3],
                f32s(&[0.10005, 0.7, 0.2, 0.5, 0.3, 0.2]),
            ),
            ("label", "INT64", vec![2], vec![1; 16]),
        ]);
        let c = compare(&p, &s, TOL);
        assert_eq!(c.outcome, Outcome::Agree);
        assert!(c.max_abs > 0.0);
    }

    #[test]
    fn integers_must_be_equal_and_mismatched_outputs_are_errors() {
        let p = answer(&[("label", "INT64", vec![1], vec![1, 0, 0, 0, 0, 0, 0, 0])]);
        let s = answer(&[("label", "INT64", vec![1], vec![2, 0, 0, 0, 0, 0, 0, 0])]);
        assert_eq!(compare(&p, &s, TOL).outcome, Outcome::Disagree);
        let other = answer(&[("classes", "INT64", vec![1], vec![1, 0, 0, 0, 0, 0, 0, 0])]);
        let Outcome::Error(why) = compare(&p, &other, TOL).outcome else {
            panic!()
        };
        assert!(why.contains("'classes'"), "{why}");
        let shape = answer(&[("label", "INT64", vec![1, 1], vec![1, 0, 0, 0, 0, 0, 0, 0])]);
        let Outcome::Error(why) = compare(&p, &shape, TOL).outcome else {
            panic!()
        };
        assert!(why.contains("[1, 1]"), "{why}");
        let missing = answer(&[]);
        let Outcome::Error(why) = compare(&p, &missing, TOL).outcome else {
            panic!()
        };
        assert!(why.contains("missing"), "{why}");
    }
}
