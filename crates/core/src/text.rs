//! Client strings in server messages: cut short, so a hostile name cannot blow up a status
//! message (and with it an HTTP/2 header list) or a log line.

use std::fmt;

/// Client-supplied strings echoed in messages keep this many bytes at most.
pub const ECHO_BYTES: usize = 64;

/// No status message is longer than this (lists of workers or models included).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A client string as it may appear in a message: the first [`ECHO_BYTES`] bytes (cut on
/// a UTF-8 boundary) and, when cut, `…(N bytes)` with its real length.
#[derive(Clone, Copy)]
pub struct Clip<'a>(pub &'a str);

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= ECHO_BYTES {
            return f.write_str(s);
        }
        write!(f, "{}…({} bytes)", prefix(s, ECHO_BYTES), s.len())
    }
}

impl fmt::Debug for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{self}'")
    }
}

/// `Clip` in one breath: `clip(&name)` inside `format!`.
pub fn clip(s: &str) -> Clip<'_> {
    Clip(s)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Caps a whole message at [`MAX_MESSAGE_BYTES`], saying how much was left out.
pub fn cap_message(msg: String) -> String {
    if msg.len() <= MAX_MESSAGE_BYTES {
        return msg;
    }
    let keep = prefix(&msg, MAX_MESSAGE_BYTES - 32);
    format!("{keep}…({} bytes in all)", msg.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_pass_and_long_ones_are_cut_on_a_char_boundary() {
        assert_eq!(clip("mlp").to_string(), "mlp");
        let long = "é".repeat(100); // 200 bytes, 2 per char
        let shown = clip(&long).to_string();
        assert!(shown.ends_with("…(200 bytes)"), "{shown}");
        assert_eq!(shown.split('…').next().unwrap().len(), 64);
    }

    #[test]
    fn messages_are_capped() {
        let msg = cap_message("x".repeat(1 << 20));
        assert!(msg.len() <= MAX_MESSAGE_BYTES, "{}", msg.len());
        assert!(msg.ends_with("(1048576 bytes in all)"));
        assert_eq!(cap_message("ok".into()), "ok");
    }
}
