//! Tensors to and from JSON nested arrays, for the command line.

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use infermesh_core::{DataType, Tensor, TensorData};
use serde_json::Value;

/// Shape of a rectangular nested array.
fn shape_of(v: &Value) -> Vec<i64> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len() as i64);
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    shape
}

fn leaves<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| leaves(i, out)),
        leaf => out.push(leaf),
    }
}

/// Encodes `value` as tensor `name` of `datatype` in the raw wire format.
pub fn encode(name: &str, datatype: DataType, value: &Value) -> anyhow::Result<(Vec<i64>, Bytes)> {
    let shape = shape_of(value);
    let mut items = Vec::new();
    leaves(value, &mut items);
    let expected: i64 = shape.iter().product();
    if items.len() as i64 != expected {
        bail!(
            "input '{name}': nested array is not rectangular (shape {shape:?}, {} values)",
            items.len()
        );
    }
    let mut out = BytesMut::new();
    for (i, v) in items.iter().enumerate() {
        let bad = || anyhow::anyhow!("input '{name}': element {i} ({v}) is not a valid {datatype}");
        let f = || {
            v.as_f64()
                .or_else(|| v.as_bool().map(|b| b as u8 as f64))
                .ok_or_else(bad)
        };
        let int = || {
            v.as_i64()
                .or_else(|| v.as_bool().map(i64::from))
                .ok_or_else(bad)
        };
        match datatype {
            DataType::Bool => out.put_u8(
                v.as_bool()
                    .map(u8::from)
                    .or(v.as_u64().map(|x| (x != 0) as u8))
                    .ok_or_else(bad)?,
            ),
            DataType::U8 => out.put_u8(int()?.try_into().map_err(|_| bad())?),
            DataType::U16 => out.put_u16_le(int()?.try_into().map_err(|_| bad())?),
            DataType::U32 => out.put_u32_le(int()?.try_into().map_err(|_| bad())?),
            DataType::U64 => out.put_u64_le(v.as_u64().ok_or_else(bad)?),
            DataType::I8 => out.put_i8(int()?.try_into().map_err(|_| bad())?),
            DataType::I16 => out.put_i16_le(int()?.try_into().map_err(|_| bad())?),
            DataType::I32 => out.put_i32_le(int()?.try_into().map_err(|_| bad())?),
            DataType::I64 => out.put_i64_le(int()?),
            DataType::F16 => out.put_slice(&half::f16::from_f64(f()?).to_le_bytes()),
            DataType::BF16 => out.put_slice(&half::bf16::from_f64(f()?).to_le_bytes()),
            DataType::F32 => out.put_f32_le(f()? as f32),
            DataType::F64 => out.put_f64_le(f()?),
            DataType::Bytes => {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.put_u32_le(s.len() as u32);
                out.put_slice(s.as_bytes());
            }
        }
    }
    Ok((shape, out.freeze()))
}

/// Decodes a raw output into a nested JSON array of its shape.
pub fn decode(name: &str, datatype: &str, shape: &[i64], raw: &Bytes) -> anyhow::Result<Value> {
    let dt = DataType::parse(datatype)
        .with_context(|| format!("output '{name}': unknown datatype {datatype}"))?;
    let input = infermesh_proto::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    };
    let t: Tensor = Tensor::decode(&input, Some(raw)).map_err(|e| anyhow::anyhow!("output {e}"))?;
    let flat: Vec<Value> = match &t.data {
        TensorData::Strings(items) => items
            .iter()
            .map(|s| Value::String(String::from_utf8_lossy(s).into()))
            .collect(),
        TensorData::Fixed(b) => {
            let size = dt.size().unwrap_or(1);
            b.chunks_exact(size)
                .map(|c| match dt {
                    DataType::Bool => Value::Bool(c[0] != 0),
                    DataType::U8 => c[0].into(),
                    DataType::U16 => u16::from_le_bytes([c[0], c[1]]).into(),
                    DataType::U32 => u32::from_le_bytes(c.try_into().unwrap()).into(),
                    DataType::U64 => u64::from_le_bytes(c.try_into().unwrap()).into(),
                    DataType::I8 => (c[0] as i8).into(),
                    DataType::I16 => i16::from_le_bytes([c[0], c[1]]).into(),
                    DataType::I32 => i32::from_le_bytes(c.try_into().unwrap()).into(),
                    DataType::I64 => i64::from_le_bytes(c.try_into().unwrap()).into(),
                    DataType::F16 => float(half::f16::from_le_bytes([c[0], c[1]]).to_f64()),
                    DataType::BF16 => float(half::bf16::from_le_bytes([c[0], c[1]]).to_f64()),
                    DataType::F32 => float(f32::from_le_bytes(c.try_into().unwrap()) as f64),
                    DataType::F64 => float(f64::from_le_bytes(c.try_into().unwrap())),
                    DataType::Bytes => Value::Null,
                })
                .collect()
        }
    };
    Ok(nest(&flat, shape))
}

/// A float as JSON: a number, or (JSON has none for them) the strings "inf", "-inf" and
/// "nan", as numpy and Triton's JSON print them.
fn float(x: f64) -> Value {
    match x {
        x if x.is_nan() => Value::String("nan".into()),
        f64::INFINITY => Value::String("inf".into()),
        f64::NEG_INFINITY => Value::String("-inf".into()),
        x => x.into(),
    }
}

fn nest(flat: &[Value], shape: &[i64]) -> Value {
    match shape.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((&n, rest)) => {
            let step = rest.iter().product::<i64>().max(0) as usize;
            Value::Array(
                (0..n as usize)
                    .map(|i| nest(&flat[i * step..(i + 1) * step], rest))
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_nested_arrays() {
        let v: Value = serde_json::from_str("[[1.5, 2], [3, -4]]").unwrap();
        let (shape, raw) = encode("x", DataType::F32, &v).unwrap();
        assert_eq!(shape, [2, 2]);
        assert_eq!(
            decode("x", "FP32", &shape, &raw).unwrap(),
            serde_json::json!([[1.5, 2.0], [3.0, -4.0]])
        );
        let s: Value = serde_json::from_str(r#"[["a"], ["bc"]]"#).unwrap();
        let (shape, raw) = encode("s", DataType::Bytes, &s).unwrap();
        assert_eq!(decode("s", "BYTES", &shape, &raw).unwrap(), s);
        let ragged: Value = serde_json::from_str("[[1], [2, 3]]").unwrap();
        assert!(encode("r", DataType::I32, &ragged).is_err());
    }

    #[test]
    fn non_finite_floats_print_as_strings() {
        let raw: Vec<u8> = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            decode("y", "FP32", &[4], &Bytes::from(raw)).unwrap(),
            serde_json::json!(["inf", "-inf", "nan", 1.5])
        );
    }
}
