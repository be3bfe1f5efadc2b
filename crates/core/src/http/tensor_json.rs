//! Tensor data as KServe v2 JSON: a request's `data` (nested or flat arrays, or a single
//! element) read straight into the little-endian bytes of its datatype, and an answer's
//! raw output written back as a flat JSON array. Every element is checked against its
//! datatype (an integer out of range, a fraction for an integer type, a string for a
//! number): the error names the element's index, what was expected and what came.

use std::fmt::Write as _;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};

use crate::DataType;

/// Reads `data` (its JSON text) into `out` as `datatype` elements; returns the count.
/// BYTES elements (strings) go length-prefixed (u32 LE), as raw contents carry them.
pub fn read(data: &str, datatype: DataType, out: &mut Vec<u8>) -> Result<usize, String> {
    if let Some(n) = fast_floats(data.as_bytes(), datatype, out) {
        return Ok(n);
    }
    let mut de = serde_json::Deserializer::from_str(data);
    let mut count = 0;
    Elements {
        datatype,
        out,
        count: &mut count,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .map_err(|e| e.to_string())?;
    Ok(count)
}

/// Float tensors, the usual case, parsed straight from the text (arrays nested at most 128
/// deep, numbers correctly rounded to the datatype). `None`, with nothing written, for
/// anything else or anything wrong: the serde path then reads it and says what is wrong.
fn fast_floats(text: &[u8], datatype: DataType, out: &mut Vec<u8>) -> Option<usize> {
    if !datatype.is_float() {
        return None;
    }
    let start = out.len();
    // At most one number per two bytes of text ("1,"): room for them all at once.
    out.reserve(text.len() / 2 * datatype.size().unwrap_or(4));
    let parsed =
        floats_at(text, 0, datatype, out).and_then(|(n, end)| (end == text.len()).then_some(n));
    if parsed.is_none() {
        out.truncate(start);
    }
    parsed
}

/// Reads one value of float elements (nested arrays, or a number) from `text[start..]`
/// into `out`: (elements, where the value and the whitespace after it end). `None` where
/// the value is anything else; `out` may then hold part of it. `datatype` is a float
/// type (`DataType::is_float`).
pub fn floats_at(
    text: &[u8],
    start: usize,
    datatype: DataType,
    out: &mut Vec<u8>,
) -> Option<(usize, usize)> {
    let (mut i, mut depth, mut count) = (start, 0usize, 0usize);
    // A value may come next (after '[' or ','); `comma`: the last token was ','.
    let (mut want_value, mut comma) = (true, false);
    loop {
        while i < text.len() && matches!(text[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        let Some(&b) = text.get(i) else {
            return (depth == 0 && !want_value).then_some((count, i));
        };
        if depth == 0 && !want_value {
            return Some((count, i)); // the value ended; what follows is the caller's
        }
        match b {
            b'[' if want_value => {
                depth += 1;
                if depth > 128 {
                    return None;
                }
                i += 1;
                comma = false;
            }
            b']' if depth > 0 && !comma => {
                depth -= 1;
                i += 1;
                want_value = false;
            }
            b',' if depth > 0 && !want_value => {
                i += 1;
                want_value = true;
                comma = true;
            }
            // JSON's number grammar: a digit first (after a sign), so no "inf" or "nan",
            // which a float parser would take.
            b'-' | b'0'..=b'9'
                if want_value
                    && text
                        .get(i + usize::from(b == b'-'))
                        .is_some_and(u8::is_ascii_digit) =>
            {
                let used = match datatype {
                    DataType::F64 => {
                        let (v, used) = fast_float2::parse_partial::<f64, _>(&text[i..]).ok()?;
                        if !v.is_finite() {
                            return None;
                        }
                        out.extend_from_slice(&v.to_le_bytes());
                        used
                    }
                    _ => {
                        let (v, used) = fast_float2::parse_partial::<f32, _>(&text[i..]).ok()?;
                        match datatype {
                            DataType::F32 if v.is_finite() => {
                                out.extend_from_slice(&v.to_le_bytes())
                            }
                            DataType::F16
                                if v.is_finite() && v.abs() <= half::f16::MAX.to_f32() =>
                            {
                                out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())
                            }
                            DataType::BF16 if v.is_finite() => {
                                out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())
                            }
                            _ => return None,
                        }
                        used
                    }
                };
                i += used;
                count += 1;
                want_value = false;
                comma = false;
            }
            _ => return None,
        }
    }
}

/// Visits nested arrays, writing each leaf.
struct Elements<'a> {
    datatype: DataType,
    out: &'a mut Vec<u8>,
    count: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Elements<'_> {
    fn at(&self) -> usize {
        *self.count
    }

    fn wrong<E: serde::de::Error>(&self, came: &str) -> E {
        E::custom(format!(
            "element {}: expected {}, found {came}",
            self.at(),
            expected(self.datatype)
        ))
    }

    fn int<E: serde::de::Error>(self, v: i128) -> Result<(), E> {
        let (out, dt) = (&mut *self.out, self.datatype);
        let range = |lo: i128, hi: i128| {
            if v < lo || v > hi {
                Err(E::custom(format!(
                    "element {}: {v} is out of range for {} ({lo} to {hi})",
                    *self.count,
                    dt.as_str()
                )))
            } else {
                Ok(())
            }
        };
        match dt {
            DataType::I8 => {
                range(i8::MIN.into(), i8::MAX.into()).map(|()| out.push(v as i8 as u8))?
            }
            DataType::I16 => range(i16::MIN.into(), i16::MAX.into())
                .map(|()| out.extend_from_slice(&(v as i16).to_le_bytes()))?,
            DataType::I32 => range(i32::MIN.into(), i32::MAX.into())
                .map(|()| out.extend_from_slice(&(v as i32).to_le_bytes()))?,
            DataType::I64 => range(i64::MIN.into(), i64::MAX.into())
                .map(|()| out.extend_from_slice(&(v as i64).to_le_bytes()))?,
            DataType::U8 => range(0, u8::MAX.into()).map(|()| out.push(v as u8))?,
            DataType::U16 => range(0, u16::MAX.into())
                .map(|()| out.extend_from_slice(&(v as u16).to_le_bytes()))?,
            DataType::U32 => range(0, u32::MAX.into())
                .map(|()| out.extend_from_slice(&(v as u32).to_le_bytes()))?,
            DataType::U64 => range(0, u64::MAX.into())
                .map(|()| out.extend_from_slice(&(v as u64).to_le_bytes()))?,
            DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64 => {
                return self.float(v as f64)
            }
            _ => return Err(self.wrong("a number")),
        }
        *self.count += 1;
        Ok(())
    }

    fn float<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        let out = &mut *self.out;
        match self.datatype {
            DataType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DataType::F32 if v.is_finite() && v.abs() > f32::MAX as f64 => {
                return Err(E::custom(format!(
                    "element {}: {v} is out of range for FP32",
                    self.at()
                )))
            }
            DataType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DataType::F16 if v.is_finite() && v.abs() > half::f16::MAX.to_f64() => {
                return Err(E::custom(format!(
                    "element {}: {v} is out of range for FP16",
                    self.at()
                )))
            }
            DataType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DataType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            _ if v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 => {
                return self.int(v as i128)
            }
            _ => return Err(self.wrong(&format!("the number {v}"))),
        }
        *self.count += 1;
        Ok(())
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} or arrays of them", expected(self.datatype))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        if self.datatype != DataType::Bool {
            return Err(self.wrong(&format!("{v}")));
        }
        self.out.push(u8::from(v));
        *self.count += 1;
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.int(v.into())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.int(v.into())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.float(v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.datatype != DataType::Bytes {
            return Err(self.wrong(&format!("a string {:?}", crate::text::clip(v).0)));
        }
        let len = u32::try_from(v.len()).map_err(|_| E::custom("string longer than 4 GiB"))?;
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(v.as_bytes());
        *self.count += 1;
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(self.wrong("null"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.wrong("an object"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (datatype, out, count) = (self.datatype, self.out, self.count);
        while seq
            .next_element_seed(Elements {
                datatype,
                out: &mut *out,
                count: &mut *count,
            })?
            .is_some()
        {}
        Ok(())
    }
}

fn expected(datatype: DataType) -> String {
    match datatype {
        DataType::Bool => "true or false (BOOL)".into(),
        DataType::Bytes => "a string (BYTES)".into(),
        DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64 => {
            format!("a number ({})", datatype.as_str())
        }
        _ => format!("an integer ({})", datatype.as_str()),
    }
}

/// Writes `raw` (the little-endian elements of `datatype`) to `out` as a flat JSON array.
/// Non-finite floats, which JSON cannot hold, are written as null. BYTES elements are
/// written as strings (bytes that are not UTF-8 are replaced, as Triton does).
pub fn write(raw: &[u8], datatype: DataType, out: &mut String) -> Result<(), String> {
    out.push('[');
    let mut first = true;
    let mut sep = |out: &mut String| {
        if !first {
            out.push(',');
        }
        first = false;
    };
    macro_rules! each {
        ($n:expr, $conv:expr) => {
            for c in raw.chunks_exact($n) {
                sep(out);
                let v = $conv(c);
                let _ = write!(out, "{v}");
            }
        };
    }
    macro_rules! floats {
        ($n:expr, $conv:expr) => {
            for c in raw.chunks_exact($n) {
                sep(out);
                let v = $conv(c);
                if v.is_finite() {
                    let _ = write!(out, "{v}");
                } else {
                    out.push_str("null");
                }
            }
        };
    }
    match datatype {
        DataType::Bool => each!(1, |c: &[u8]| c[0] != 0),
        DataType::U8 => each!(1, |c: &[u8]| c[0]),
        DataType::I8 => each!(1, |c: &[u8]| c[0] as i8),
        DataType::U16 => each!(2, |c: &[u8]| u16::from_le_bytes([c[0], c[1]])),
        DataType::I16 => each!(2, |c: &[u8]| i16::from_le_bytes([c[0], c[1]])),
        DataType::U32 => each!(4, |c: &[u8]| u32::from_le_bytes(c.try_into().expect("4"))),
        DataType::I32 => each!(4, |c: &[u8]| i32::from_le_bytes(c.try_into().expect("4"))),
        DataType::U64 => each!(8, |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8"))),
        DataType::I64 => each!(8, |c: &[u8]| i64::from_le_bytes(c.try_into().expect("8"))),
        DataType::F16 => floats!(2, |c: &[u8]| half::f16::from_le_bytes([c[0], c[1]])
            .to_f32()),
        DataType::BF16 => floats!(2, |c: &[u8]| half::bf16::from_le_bytes([c[0], c[1]])
            .to_f32()),
        DataType::F32 => floats!(4, |c: &[u8]| f32::from_le_bytes(c.try_into().expect("4"))),
        DataType::F64 => floats!(8, |c: &[u8]| f64::from_le_bytes(c.try_into().expect("8"))),
        DataType::Bytes => {
            let mut rest = raw;
            while !rest.is_empty() {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err("a BYTES element's length is cut short".into());
                };
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err("a BYTES element is longer than the output".into());
                }
                sep(out);
                let s = String::from_utf8_lossy(&tail[..len]);
                out.push_str(&serde_json::to_string(&s).map_err(|e| e.to_string())?);
                rest = &tail[len..];
            }
        }
    }
    out.push(']');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn back(data: &str, dt: DataType) -> Result<String, String> {
        let mut raw = Vec::new();
        read(data, dt, &mut raw)?;
        let mut out = String::new();
        write(&raw, dt, &mut out)?;
        Ok(out)
    }

    #[test]
    fn nested_or_flat_every_datatype_round_trips() {
        assert_eq!(
            back("[[1, 2], [3, 4]]", DataType::F32).unwrap(),
            "[1,2,3,4]"
        );
        assert_eq!(back("[1.5, -2.25]", DataType::F16).unwrap(), "[1.5,-2.25]");
        assert_eq!(back("[0.5]", DataType::BF16).unwrap(), "[0.5]");
        assert_eq!(back("[-128, 127]", DataType::I8).unwrap(), "[-128,127]");
        assert_eq!(
            back("[18446744073709551615]", DataType::U64).unwrap(),
            "[18446744073709551615]"
        );
        assert_eq!(
            back("[true, false]", DataType::Bool).unwrap(),
            "[true,false]"
        );
        assert_eq!(
            back("[\"a\", \"b\\\"c\"]", DataType::Bytes).unwrap(),
            "[\"a\",\"b\\\"c\"]"
        );
        assert_eq!(back("7", DataType::I32).unwrap(), "[7]");
        assert_eq!(back("[3.0]", DataType::I64).unwrap(), "[3]");
    }

    #[test]
    fn an_element_that_does_not_fit_names_its_index() {
        for (data, dt, expect) in [
            (
                "[1, 300]",
                DataType::U8,
                "element 1: 300 is out of range for UINT8",
            ),
            (
                "[1, 2.5]",
                DataType::I32,
                "element 1: expected an integer (INT32), found the number 2.5",
            ),
            ("[1e39]", DataType::F32, "out of range for FP32"),
            (
                "[\"x\"]",
                DataType::F32,
                "expected a number (FP32), found a string",
            ),
            ("[1]", DataType::Bytes, "expected a string (BYTES)"),
            ("[null]", DataType::F32, "found null"),
            ("[1, 2", DataType::F32, "EOF"),
        ] {
            let err = back(data, dt).unwrap_err();
            assert!(err.contains(expect), "{data}: {err}");
        }
        let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(back(&deep, DataType::F32)
            .unwrap_err()
            .contains("recursion limit"));
    }
}
