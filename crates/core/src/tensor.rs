//! Tensors as they travel: element type, shape and little-endian bytes.
//!
//! Decoding turns a request's inputs (typed `contents` or `raw_input_contents`) into
//! [`Tensor`]s and rejects every malformed one with a message that names the input, what
//! was expected and what came. Outputs always go back raw (tritonclient's `as_numpy`
//! decodes only `raw_output_contents`).

use bytes::{BufMut, Bytes, BytesMut};
use infermesh_proto::{
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferTensorContents,
};

use crate::{
    invalid,
    text::{clip, Clip},
    DataType, Result,
};

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Element storage. Fixed-size types keep the wire bytes (row-major, little-endian), so a
/// raw input reaches the engine without being copied.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    Fixed(Bytes),
    Strings(Vec<Bytes>),
}

/// A dimension is at most this (what ONNX Runtime and most frameworks index with i32).
pub const MAX_DIM: i64 = i32::MAX as i64;

/// Elements in one tensor at most (2^40): far beyond any message, so the count and its
/// byte size stay exact in u64 whatever the shape claims.
pub const MAX_ELEMENTS: u64 = 1 << 40;

/// Number of elements for `shape`; rejects negative dims, dims over [`MAX_DIM`] and
/// counts over [`MAX_ELEMENTS`]. This is only what the shape claims: decoding compares it
/// with the bytes that came before anything is allocated.
pub fn element_count(name: &str, shape: &[i64]) -> Result<usize> {
    let name = clip(name);
    let shown = Shape(shape);
    for (i, &d) in shape.iter().enumerate() {
        if !(0..=MAX_DIM).contains(&d) {
            return Err(invalid!(
                "input '{name}': dim {i} is {d}; expected 0..={MAX_DIM} (shape {shown})"
            ));
        }
    }
    // Zero-sized dims make zero elements, but the other dims are bounded all the same.
    let bounded = shape.iter().try_fold(1u64, |acc, &d| {
        acc.checked_mul((d as u64).max(1))
            .filter(|&n| n <= MAX_ELEMENTS)
    });
    if bounded.is_none() {
        return Err(invalid!(
            "input '{name}': shape {shown} has more than {MAX_ELEMENTS} elements"
        ));
    }
    Ok(shape.iter().map(|&d| d as usize).product())
}

/// A client's shape in a message: at most 16 dims shown.
pub struct Shape<'a>(pub &'a [i64]);

impl std::fmt::Display for Shape<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 16;
        if self.0.len() <= SHOWN {
            return write!(f, "{:?}", self.0);
        }
        let head = &self.0[..SHOWN];
        write!(f, "{head:?}…({} dims)", self.0.len())
    }
}

impl Tensor {
    pub fn element_count(&self) -> usize {
        match &self.data {
            TensorData::Fixed(b) => b.len() / self.datatype.size().unwrap_or(1),
            TensorData::Strings(s) => s.len(),
        }
    }

    /// Decodes one request input. `raw` is its entry of `raw_input_contents`, if the
    /// request used raw contents.
    pub fn decode(input: &InferInputTensor, raw: Option<&Bytes>) -> Result<Tensor> {
        // Shown cut short in messages; no copy unless a message is made.
        let name = clip(&input.name);
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            invalid!(
                "input '{name}': unknown datatype '{}'; expected one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64, BYTES",
                clip(&input.datatype)
            )
        })?;
        let count = element_count(&input.name, &input.shape)?;
        let data = match (raw, &input.contents) {
            (Some(_), Some(c)) if !contents_empty(c) => {
                return Err(invalid!(
                    "input '{name}': has both raw_input_contents and typed contents; send exactly one"
                ))
            }
            (Some(raw), _) => decode_raw(name, datatype, count, raw)?,
            (None, Some(c)) => decode_typed(name, datatype, count, c)?,
            (None, None) => {
                return Err(invalid!(
                    "input '{name}': no data; expected {count} {datatype} elements in contents or raw_input_contents"
                ))
            }
        };
        Ok(Tensor {
            name: input.name.clone(),
            datatype,
            shape: input.shape.clone(),
            data,
        })
    }

    /// Decodes one output of an answer (a worker's, read back by the HTTP door or a
    /// shadow comparison) by the rules of an input: `raw` is its `raw_output_contents` entry.
    pub fn decode_output(output: &InferOutputTensor, raw: Option<&Bytes>) -> Result<Tensor> {
        let as_input = InferInputTensor {
            name: output.name.clone(),
            datatype: output.datatype.clone(),
            shape: output.shape.clone(),
            parameters: Default::default(),
            contents: output.contents.clone(),
        };
        Self::decode(&as_input, raw)
    }

    /// The tensor's bytes in the raw wire format.
    pub fn to_raw(&self) -> Bytes {
        match &self.data {
            TensorData::Fixed(b) => b.clone(),
            TensorData::Strings(items) => {
                let len = items.iter().map(|s| s.len() + 4).sum();
                let mut out = BytesMut::with_capacity(len);
                for s in items {
                    out.put_u32_le(s.len() as u32);
                    out.put_slice(s);
                }
                out.freeze()
            }
        }
    }
}

/// Decodes all inputs of a request: raw contents, when present, hold one entry per input
/// in order.
pub fn decode_inputs(inputs: &[InferInputTensor], raw: &[Bytes]) -> Result<Vec<Tensor>> {
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(invalid!(
            "raw_input_contents has {} entries; expected one per input ({})",
            raw.len(),
            inputs.len()
        ));
    }
    let mut out: Vec<Tensor> = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        if out.iter().any(|t| t.name == input.name) {
            return Err(invalid!(
                "input '{}': given more than once",
                clip(&input.name)
            ));
        }
        out.push(Tensor::decode(input, raw.get(i))?);
    }
    Ok(out)
}

fn contents_empty(c: &InferTensorContents) -> bool {
    c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty()
}

fn decode_raw(name: Clip<'_>, dt: DataType, count: usize, raw: &Bytes) -> Result<TensorData> {
    let Some(size) = dt.size() else {
        return decode_raw_strings(name, count, raw).map(TensorData::Strings);
    };
    // In u128: exact for any count, so no shape can wrap around to the bytes that came.
    let expected = count as u128 * size as u128;
    if raw.len() as u128 != expected {
        return Err(invalid!(
            "input '{name}': raw content has {} bytes; expected {expected} ({count} {dt} elements of {size} bytes)",
            raw.len()
        ));
    }
    Ok(TensorData::Fixed(raw.clone()))
}

/// Splits length-prefixed BYTES elements without copying them.
fn decode_raw_strings(name: Clip<'_>, count: usize, raw: &Bytes) -> Result<Vec<Bytes>> {
    // Each element takes at least its 4-byte prefix: the bytes bound the count.
    let mut items = Vec::with_capacity(count.min(raw.len() / 4));
    let mut at = 0usize;
    for i in 0..count {
        let Some(prefix) = raw.get(at..at + 4) else {
            return Err(invalid!(
                "input '{name}': BYTES element {i} needs a 4-byte length prefix at offset {at}, but the raw content has only {} bytes ({count} elements expected)",
                raw.len()
            ));
        };
        let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
        at += 4;
        if raw.len() - at < len {
            return Err(invalid!(
                "input '{name}': BYTES element {i} declares {len} bytes, but only {} remain in the raw content",
                raw.len() - at
            ));
        }
        items.push(raw.slice(at..at + len));
        at += len;
    }
    if at != raw.len() {
        return Err(invalid!(
            "input '{name}': raw content has {} bytes left over after the {count} BYTES elements its shape holds",
            raw.len() - at
        ));
    }
    Ok(items)
}

fn decode_typed(
    name: Clip<'_>,
    dt: DataType,
    count: usize,
    c: &InferTensorContents,
) -> Result<TensorData> {
    // Which typed field carries each datatype (the protocol's table).
    let (field, got) = match dt {
        DataType::Bool => ("bool_contents", c.bool_contents.len()),
        DataType::I8 | DataType::I16 | DataType::I32 => ("int_contents", c.int_contents.len()),
        DataType::I64 => ("int64_contents", c.int64_contents.len()),
        DataType::U8 | DataType::U16 | DataType::U32 => ("uint_contents", c.uint_contents.len()),
        DataType::U64 => ("uint64_contents", c.uint64_contents.len()),
        DataType::F32 => ("fp32_contents", c.fp32_contents.len()),
        DataType::F64 => ("fp64_contents", c.fp64_contents.len()),
        DataType::Bytes => ("bytes_contents", c.bytes_contents.len()),
        DataType::F16 | DataType::BF16 => {
            return Err(invalid!(
                "input '{name}': {dt} has no typed contents field; send it in raw_input_contents"
            ))
        }
    };
    if got != count {
        return Err(invalid!(
            "input '{name}': {field} has {got} elements; expected {count} for its shape"
        ));
    }
    let mut out = BytesMut::with_capacity(count * dt.size().unwrap_or(0));
    let range = |v: i64, lo: i64, hi: i64| {
        if v < lo || v > hi {
            Err(invalid!(
                "input '{name}': value {v} is out of range for {dt}"
            ))
        } else {
            Ok(v)
        }
    };
    match dt {
        DataType::Bool => c.bool_contents.iter().for_each(|&b| out.put_u8(b as u8)),
        DataType::I8 => {
            for &v in &c.int_contents {
                out.put_i8(range(v.into(), i8::MIN.into(), i8::MAX.into())? as i8);
            }
        }
        DataType::I16 => {
            for &v in &c.int_contents {
                out.put_i16_le(range(v.into(), i16::MIN.into(), i16::MAX.into())? as i16);
            }
        }
        DataType::I32 => c.int_contents.iter().for_each(|&v| out.put_i32_le(v)),
        DataType::I64 => c.int64_contents.iter().for_each(|&v| out.put_i64_le(v)),
        DataType::U8 => {
            for &v in &c.uint_contents {
                out.put_u8(range(v.into(), 0, u8::MAX.into())? as u8);
            }
        }
        DataType::U16 => {
            for &v in &c.uint_contents {
                out.put_u16_le(range(v.into(), 0, u16::MAX.into())? as u16);
            }
        }
        DataType::U32 => c.uint_contents.iter().for_each(|&v| out.put_u32_le(v)),
        DataType::U64 => c.uint64_contents.iter().for_each(|&v| out.put_u64_le(v)),
        DataType::F32 => c.fp32_contents.iter().for_each(|&v| out.put_f32_le(v)),
        DataType::F64 => c.fp64_contents.iter().for_each(|&v| out.put_f64_le(v)),
        DataType::Bytes => return Ok(TensorData::Strings(c.bytes_contents.clone())),
        DataType::F16 | DataType::BF16 => unreachable!("rejected above"),
    }
    Ok(TensorData::Fixed(out.freeze()))
}

#[cfg(test)]
mod tests;
