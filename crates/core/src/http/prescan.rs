//! One pass over an inference request's JSON that reads each float input's `data` as it
//! goes (straight into little-endian bytes), so the 784 numbers of an MLP's input are
//! read once, not scanned by serde and parsed again. What remains, the envelope with those
//! arrays written as `null`, is small and goes to serde as before.
//!
//! Anything this pass does not expect (an escape in a key, a datatype after its data, an
//! integer tensor, malformed JSON) makes it give up: `None`, and the request is read the
//! ordinary way, which also words every error.

use std::collections::HashMap;

use super::tensor_json::floats_at;
use crate::DataType;

/// The envelope, and the bytes and element count of each input read here, by input index.
pub struct Prescanned {
    pub envelope: String,
    pub data: HashMap<usize, Vec<u8>>,
}

pub fn prescan(text: &str) -> Option<Prescanned> {
    let b = text.as_bytes();
    let mut s = Scan {
        b,
        i: 0,
        cut: Vec::new(),
        data: HashMap::new(),
    };
    s.ws();
    s.expect(b'{')?;
    s.members(|s, key| match key {
        b"inputs" => s.inputs(),
        _ => s.skip_value(),
    })?;
    s.ws();
    if s.i != b.len() || s.data.is_empty() {
        return None;
    }
    let mut envelope = String::with_capacity(b.len() / 8);
    let mut at = 0;
    for (start, end) in &s.cut {
        envelope.push_str(&text[at..*start]);
        envelope.push_str("null");
        at = *end;
    }
    envelope.push_str(&text[at..]);
    Some(Prescanned {
        envelope,
        data: s.data,
    })
}

/// The most bytes reserved up front from a shape (what a client claims): beyond it, the
/// buffer grows with the elements that really come.
const MAX_RESERVE: usize = 16 << 20;

/// The element count of a shape written as `[d0, d1, ...]`, when every dimension is a
/// plain non-negative integer.
fn count(shape: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(shape).ok()?.trim();
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .split(',')
        .map(|d| d.trim().parse::<usize>().ok())
        .try_fold(1usize, |n, d| n.checked_mul(d?))
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// Byte ranges of the `data` values read here.
    cut: Vec<(usize, usize)>,
    data: HashMap<usize, Vec<u8>>,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while self
            .b
            .get(self.i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// A string without escapes (a key, a datatype): its bytes.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' => return None,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        Some(&self.b[start..self.i - 1])
    }

    /// An object's members, `{` already taken: each key to `value`, which reads its value.
    fn members(&mut self, mut value: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.plain_string()?;
            self.expect(b':')?;
            value(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn inputs(&mut self) -> Option<()> {
        self.expect(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        let mut index = 0;
        loop {
            self.expect(b'{')?;
            let (mut datatype, mut elements) = (None, None);
            self.members(|s, key| match key {
                b"shape" => {
                    let start = s.i;
                    s.skip_value()?;
                    elements = count(&s.b[start..s.i]);
                    Some(())
                }
                b"datatype" => {
                    datatype = DataType::parse(std::str::from_utf8(s.plain_string()?).ok()?);
                    Some(())
                }
                b"data" => {
                    // Other datatypes, or a datatype still to come: left to serde.
                    let Some(dt) = datatype.filter(|d| d.is_float()) else {
                        return s.skip_value();
                    };
                    let start = {
                        s.ws();
                        s.i
                    };
                    // Room for the shape's elements at once, when the shape came first.
                    let size = dt.size().unwrap_or(4);
                    let mut out = Vec::with_capacity(
                        elements.map_or(0, |n: usize| n.min(MAX_RESERVE / size) * size),
                    );
                    let (_, end) = floats_at(s.b, start, dt, &mut out)?;
                    s.i = end;
                    s.cut.push((start, end));
                    s.data.insert(index, out).is_none().then_some(())
                }
                _ => s.skip_value(),
            })?;
            index += 1;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Any value, not read: strings (escapes honoured), nested arrays and objects, scalars.
    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        let mut depth = 0usize;
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    loop {
                        match *self.b.get(self.i)? {
                            b'"' => break,
                            b'\\' => self.i += 2,
                            _ => self.i += 1,
                        }
                    }
                    self.i += 1;
                }
                b'[' | b'{' => {
                    depth += 1;
                    if depth > 128 {
                        return None;
                    }
                    self.i += 1;
                }
                b']' | b'}' if depth > 0 => {
                    depth -= 1;
                    self.i += 1;
                }
                b',' | b']' | b'}' if depth == 0 => return Some(()),
                _ => self.i += 1,
            }
            if depth == 0 && matches!(self.b.get(self.i), Some(b',' | b']' | b'}') | None) {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_data_is_read_in_one_pass_and_the_rest_left_to_serde() {
        let text = r#"{"id":"a\"b","inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"p":"[}"},"data":[1, 2.5]},{"name":"k","datatype":"INT32","shape":[1],"data":[3]}],"outputs":[]}"#;
        let p = prescan(text).expect("prescanned");
        assert_eq!(
            p.data[&0],
            [1f32.to_le_bytes(), 2.5f32.to_le_bytes()].concat()
        );
        assert!(!p.data.contains_key(&1), "integers are left to serde");
        assert!(
            p.envelope.contains(r#""data":null}"#) && p.envelope.contains(r#""data":[3]"#),
            "{}",
            p.envelope
        );
        let v: serde_json::Value = serde_json::from_str(&p.envelope).unwrap();
        assert_eq!(v["id"], "a\"b");
        // Given up on: data before its datatype, malformed text, no float input at all.
        for text in [
            r#"{"inputs":[{"data":[1],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"datatype":"FP32","data":[1,]}]}"#,
            r#"{"inputs":[{"datatype":"FP32","data":[1]}]"#,
            r#"{"inputs":[{"datatype":"BYTES","data":["a"]}]}"#,
        ] {
            assert!(prescan(text).is_none(), "{text}");
        }
    }
}
