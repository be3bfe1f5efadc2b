//! The routing file (`--routes`), as written:
//!
//! ```yaml
//! models:
//!   mlp:
//!     split: {"1": 9, "2": 1}   # relative weights for requests that name no version
//!     fallback: false           # true: a version with no ready worker shares its part
//!     hedge: {after: p95}       # or {after_ms: 5}: at most one extra copy
//!     shadow: {target: {version: "2"}, percent: 25}   # see `rules`
//!     guard: {version: "2", max_error_rate: 0.02}     # see `rules`
//!     copies: {min: 2, max: 8}  # placement-mode workers: copies kept loaded, and the most
//! ```
//!
//! Every check is made while the file is read, so an error names the field, its line and
//! column, what was expected and what came (serde_yaml adds the path and position).

use std::collections::BTreeMap;

use serde::{de::Error as _, Deserialize, Deserializer};

use super::rules::{self, Guard, Shadow};

/// The largest sum of a split's weights (the length of its precomputed schedule).
pub const MAX_TOTAL_WEIGHT: u64 = 10_000;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub models: BTreeMap<String, Entry>,
}

/// One model's routing.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
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
    /// A copy of answered requests to another version or model, answers compared.
    #[serde(default, deserialize_with = "rules::shadow")]
    pub shadow: Option<Shadow>,
    /// Takes a version out of the split when its errors or disagreement cross a line.
    #[serde(default, deserialize_with = "rules::guard")]
    pub guard: Option<Guard>,
    /// On placement-mode workers: copies loaded ahead of requests (and pinned), and the
    /// most that load may add.
    #[serde(default)]
    pub copies: Option<Copies>,
}

/// `copies: {min, max}`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Copies {
    /// Loaded ahead of traffic on the model's first-ranked workers, pinned there.
    #[serde(default)]
    pub min: u32,
    /// The most copies load may bring (default: every placement-mode worker).
    #[serde(default)]
    pub max: Option<u32>,
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
        if let Some(Copies {
            min,
            max: Some(max),
        }) = entry.copies
        {
            if max == 0 || max < min {
                return Err(format!(
                    "models.{model}.copies.max: expected at least 1 and at least min ({min}), found {max}"
                ));
            }
        }
        if let Some(guard) = &entry.guard {
            let versions: Vec<i64> = entry.split.iter().flatten().map(|(v, _)| *v).collect();
            if !versions.contains(&guard.version) {
                return Err(format!(
                    "models.{model}.guard.version: expected a version of the model's split {versions:?} (the guard takes it out of the split), found {}",
                    guard.version
                ));
            }
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
    // Checked inside the map's own visit, so an error points at the split's line.
    d.deserialize_map(SplitVisitor).map(Some)
}

struct SplitVisitor;

impl<'de> serde::de::Visitor<'de> for SplitVisitor {
    type Value = BTreeMap<i64, u32>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map of version: weight")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut out = BTreeMap::new();
        while let Some((key, weight)) = map.next_entry::<KeyString, u32>()? {
            let key = key.0;
            let version: i64 = key.trim().parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
                M::Error::custom(format!(
                    "expected a version number (1 or more) as key, found '{key}'"
                ))
            })?;
            if out.insert(version, weight).is_some() {
                return Err(M::Error::custom(format!(
                    "version {version} is listed twice"
                )));
            }
        }
        if out.is_empty() {
            return Err(M::Error::custom(
                "expected at least one version: weight, found an empty split",
            ));
        }
        let total: u64 = out.values().map(|w| u64::from(*w)).sum();
        if total == 0 {
            return Err(M::Error::custom(
                "expected weights that sum to more than 0, found a sum of 0",
            ));
        }
        if total > MAX_TOTAL_WEIGHT {
            return Err(M::Error::custom(format!(
                "expected weights that sum to at most {MAX_TOTAL_WEIGHT}, found {total} (weights are relative: 99 and 1 is 1 %)"
            )));
        }
        Ok(out)
    }
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

fn hedge<'de, D: Deserializer<'de>>(d: D) -> Result<Option<After>, D::Error> {
    // Checked inside the map's own visit, so an error points at the hedge's line.
    d.deserialize_map(HedgeVisitor).map(Some)
}

struct HedgeVisitor;

impl<'de> serde::de::Visitor<'de> for HedgeVisitor {
    type Value = After;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{after: p95} or {after_ms: 5}")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<After, M::Error> {
        let (mut after, mut after_ms) = (None::<String>, None::<f64>);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "after" => after = Some(map.next_value()?),
                "after_ms" => after_ms = Some(map.next_value()?),
                other => return Err(M::Error::unknown_field(other, &["after", "after_ms"])),
            }
        }
        match (after, after_ms) {
            (Some(p), None) => p
                .strip_prefix('p')
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| PERCENTILES.contains(n))
                .map(After::Percentile)
                .ok_or_else(|| {
                    M::Error::custom(format!(
                        "after: expected one of p50, p90, p95, p99, found '{p}'"
                    ))
                }),
            (None, Some(ms)) if ms.is_finite() && ms >= 0.0 => Ok(After::Ms(ms)),
            (None, Some(ms)) => Err(M::Error::custom(format!(
                "after_ms: expected milliseconds, 0 or more, found {ms}"
            ))),
            _ => Err(M::Error::custom(
                "expected exactly one of `after` (p50, p90, p95, p99) and `after_ms`",
            )),
        }
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
        let f =
            parse("models:\n  mlp:\n    copies: {min: 2, max: 8}\n  one:\n    copies: {min: 1}\n")
                .unwrap();
        assert_eq!(
            f.models["mlp"].copies,
            Some(Copies {
                min: 2,
                max: Some(8)
            })
        );
        assert_eq!(f.models["one"].copies, Some(Copies { min: 1, max: None }));
        let f = parse(
            "models:\n  mlp:\n    split: {1: 9, 2: 1}\n    shadow:\n      target: {version: \"2\"}\n      percent: 25\n      compare: {atol: 1.0e-4, rtol: 1.0e-3}\n    guard:\n      version: \"2\"\n      max_error_rate: 0.02\n      min_agreement: 0.99\n      window_s: 30\n      min_requests: 200\n  other:\n    shadow: {target: {model: cand, version: \"\"}}\n",
        )
        .unwrap();
        let shadow = f.models["mlp"].shadow.clone().unwrap();
        assert_eq!(
            (shadow.version, shadow.per_10k, shadow.tolerance.atol),
            (Some(2), 2500, 1e-4)
        );
        assert_eq!(shadow.label("mlp"), "mlp:2");
        let guard = f.models["mlp"].guard.clone().unwrap();
        assert_eq!(
            (guard.version, guard.window_s, guard.min_requests),
            (2, 30, 200)
        );
        let other = f.models["other"].shadow.clone().unwrap();
        assert_eq!(
            (other.label("other"), other.per_10k, other.tolerance.rtol),
            ("cand".into(), 10_000, 1e-5)
        );
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
            ("models:\n  mlp:\n    shadow: {percent: 5}\n", "missing field `target`"),
            ("models:\n  mlp:\n    shadow: {target: {version: x}}\n", "found 'x'"),
            ("models:\n  mlp:\n    shadow: {target: {}, percent: 101}\n", "found 101"),
            ("models:\n  mlp:\n    shadow: {target: {}, compare: {atol: -1}}\n", "compare.atol"),
            ("models:\n  mlp:\n    shadow: {target: {}, mirror: 1}\n", "unknown field `mirror`"),
            ("models:\n  mlp:\n    split: {1: 1}\n    guard: {version: 1}\n", "a guard with neither"),
            ("models:\n  mlp:\n    split: {1: 1}\n    guard: {version: 1, max_error_rate: 2}\n", "found 2"),
            ("models:\n  mlp:\n    split: {1: 1}\n    guard: {version: 1, min_agreement: 0.9, window_s: 0}\n", "window_s"),
            ("models:\n  mlp:\n    guard: {version: 2, max_error_rate: 0.1}\n", "models.mlp.guard.version"),
            ("models:\n  mlp:\n    split: {1: 1}\n    guard: {version: 2, max_error_rate: 0.1}\n", "split [1]"),
            ("models:\n  mlp:\n    copies: {min: 3, max: 2}\n", "models.mlp.copies.max"),
            ("models:\n  mlp:\n    copies: {min: -1}\n", "line 3"),
            ("models:\n  mlp:\n    copies: {least: 1}\n", "unknown field `least`"),
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
