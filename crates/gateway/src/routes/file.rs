//! The routing file (`--routes`), as written:
//!
//! ```yaml
//! models:
//!   mlp:
//!     split: {"1": 9, "2": 1}   # relative weights for requests that name no version
//!     fallback: false           # true: a version with no ready worker shares its part
//!     hedge: {after: p95}       # or {after_ms: 5}: at most one extra copy
//! ```
//!
//! Every check is made while the file is read, so an error names the field, its line and
//! column, what was expected and what came (serde_yaml adds the path and position).

use std::collections::BTreeMap;

use serde::{de::Error as _, Deserialize, Deserializer};

/// The largest sum of a split's weights (the length of its precomputed schedule).
pub const MAX_TOTAL_WEIGHT: u64 = 10_000;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub models: BTreeMap<String, Entry>,
}

/// One model's routing.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Version → weight, for requests that name no version.
    #[serde(default, deserialize_with = "split")]
    pub split: Option<BTreeMap<i64, u32>>,
    /// A version with no ready worker shares its part among the others (else its part
    /// fails with `version-unavailable`).
    #[serde(default)]
    pub fallback: bool,
    #[serde(default, deserialize_with = "hedge")]
    pub hedge: Option<After>,
}

/// When a hedge is sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum After {
    /// This many milliseconds after the first attempt started.
    Ms(f64),
    /// The (model, version)'s observed percentile (50, 90, 95 or 99).
    Percentile(u8),
}

impl std::fmt::Display for After {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ms(ms) => write!(f, "after_ms: {ms}"),
            Self::Percentile(p) => write!(f, "after: p{p}"),
        }
    }
}

/// The percentiles `after` may name (the ones the latency histogram keeps current).
pub const PERCENTILES: [u8; 4] = [50, 90, 95, 99];

/// Parses the file's text. Also checks what serde cannot: a `fallback` needs a split.
pub fn parse(text: &str) -> Result<File, String> {
    let file: File = if text.trim().is_empty() {
        File::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| e.to_string())?
    };
    for (model, entry) in &file.models {
        if entry.fallback && entry.split.is_none() {
            return Err(format!(
                "models.{model}.fallback: true needs a split to fall back within; expected a `split` beside it, found none"
            ));
        }
    }
    Ok(file)
}

/// A version key as YAML gives it: `1` or `"1"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Key {
    Number(i64),
    Text(String),
}

fn split<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<i64, u32>>, D::Error> {
    let raw: BTreeMap<String, u32> = BTreeMap::<KeyString, u32>::deserialize(d)?
        .into_iter()
        .map(|(k, w)| (k.0, w))
        .collect();
    if raw.is_empty() {
        return Err(D::Error::custom(
            "expected at least one version: weight, found an empty split",
        ));
    }
    let mut out = BTreeMap::new();
    for (key, weight) in raw {
        let version: i64 = key.trim().parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
            D::Error::custom(format!(
                "expected a version number (1 or more) as key, found '{key}'"
            ))
        })?;
        if out.insert(version, weight).is_some() {
            return Err(D::Error::custom(format!(
                "version {version} is listed twice"
            )));
        }
    }
    let total: u64 = out.values().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return Err(D::Error::custom(
            "expected weights that sum to more than 0, found a sum of 0",
        ));
    }
    if total > MAX_TOTAL_WEIGHT {
        return Err(D::Error::custom(format!(
            "expected weights that sum to at most {MAX_TOTAL_WEIGHT}, found {total} (weights are relative: 99 and 1 is 1 %)"
        )));
    }
    Ok(Some(out))
}

/// A key read as text, whether YAML wrote it as a number or a string.
struct KeyString(String);

impl<'de> Deserialize<'de> for KeyString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(match Key::deserialize(d)? {
            Key::Number(n) => n.to_string(),
            Key::Text(s) => s,
        }))
    }
}

impl PartialEq for KeyString {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for KeyString {}
impl PartialOrd for KeyString {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KeyString {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HedgeText {
    after: Option<String>,
    after_ms: Option<f64>,
}

fn hedge<'de, D: Deserializer<'de>>(d: D) -> Result<Option<After>, D::Error> {
    let h = HedgeText::deserialize(d)?;
    match (h.after, h.after_ms) {
        (Some(p), None) => {
            let n = p
                .strip_prefix('p')
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| PERCENTILES.contains(n));
            n.map(|n| Some(After::Percentile(n))).ok_or_else(|| {
                D::Error::custom(format!(
                    "after: expected one of p50, p90, p95, p99, found '{p}'"
                ))
            })
        }
        (None, Some(ms)) if ms.is_finite() && ms >= 0.0 => Ok(Some(After::Ms(ms))),
        (None, Some(ms)) => Err(D::Error::custom(format!(
            "after_ms: expected milliseconds, 0 or more, found {ms}"
        ))),
        _ => Err(D::Error::custom(
            "expected exactly one of `after` (p50, p90, p95, p99) and `after_ms`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_file_reads_and_numbers_or_strings_name_versions() {
        let f = parse(
            "models:\n  mlp:\n    split: {\"1\": 9, 2: 1}\n    hedge: {after: p95}\n  other:\n    hedge: {after_ms: 5}\n",
        )
        .unwrap();
        let mlp = &f.models["mlp"];
        assert_eq!(mlp.split, Some([(1, 9), (2, 1)].into()));
        assert_eq!(mlp.hedge, Some(After::Percentile(95)));
        assert!(!mlp.fallback);
        assert_eq!(f.models["other"].hedge, Some(After::Ms(5.0)));
        assert_eq!(f.models["other"].split, None);
        assert_eq!(parse("").unwrap(), File::default());
    }

    #[test]
    fn every_mistake_names_its_field_and_line() {
        for (text, expect) in [
            (
                "models:\n  mlp:\n    splitt: {\"1\": 1}\n",
                "unknown field `splitt`",
            ),
            ("models:\n  mlp:\n    split: {\"1\": -1}\n", "line 3"),
            ("models:\n  mlp:\n    split: {\"x\": 1}\n", "found 'x'"),
            (
                "models:\n  mlp:\n    split: {\"1\": 0, \"2\": 0}\n",
                "sum of 0",
            ),
            (
                "models:\n  mlp:\n    split: {\"1\": 9999, \"2\": 2}\n",
                "at most 10000",
            ),
            ("models:\n  mlp:\n    split: {}\n", "empty split"),
            ("models:\n  mlp:\n    hedge: {after: p97}\n", "found 'p97'"),
            (
                "models:\n  mlp:\n    hedge: {after: p95, after_ms: 3}\n",
                "exactly one",
            ),
            ("models:\n  mlp:\n    hedge: {after_ms: -3}\n", "found -3"),
            (
                "models:\n  mlp:\n    fallback: true\n",
                "models.mlp.fallback",
            ),
            ("modelz: {}\n", "unknown field `modelz`"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
        let err = parse("models:\n  mlp:\n    split: {\"1\": 1.5}\n").unwrap_err();
        assert!(
            err.contains("models.mlp.split") && err.contains("line 3"),
            "{err}"
        );
    }
}
