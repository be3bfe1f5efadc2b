//! The routing file's `shadow` and `guard` keys, as written:
//!
//! ```yaml
//! shadow:                        # a copy of live traffic, never seen by the client
//!   target: {version: "2"}       # or {model: mlp-candidate, version: ""}
//!   percent: 25                  # of the model's answered requests (default 100)
//!   compare: {atol: 1.0e-4, rtol: 1.0e-3}   # default: numpy's isclose, 1e-8 and 1e-5
//! guard:                         # automatic rollback of the split
//!   version: "2"
//!   max_error_rate: 0.02         # at least one of max_error_rate and min_agreement
//!   min_agreement: 0.99
//!   window_s: 30                 # default 30
//!   min_requests: 200            # default 100
//! ```
//!
//! Each is read into its own struct (unknown keys refused) and checked while its map is
//! being read, so an error points at the key's own line; it names the key, what was
//! expected and what came (serde_yaml adds the path and position).

use serde::{
    de::{value::MapAccessDeserializer, Error as _, MapAccess, Visitor},
    Deserialize, Deserializer,
};

use crate::shadow::compare::Tolerance;

/// Where shadow copies go.
#[derive(Clone, Debug, PartialEq)]
pub struct Shadow {
    /// `None`: the same model.
    pub model: Option<String>,
    /// `None`: the newest version a ready worker has.
    pub version: Option<i64>,
    /// Copies per 10,000 answered requests.
    pub per_10k: u32,
    pub tolerance: Tolerance,
}

impl Shadow {
    /// The target as metrics and `infermesh routes` name it: `model:version`, or the model
    /// alone for its newest version.
    pub fn label(&self, model: &str) -> String {
        let model = self.model.as_deref().unwrap_or(model);
        match self.version {
            Some(v) => format!("{model}:{v}"),
            None => model.to_string(),
        }
    }
}

/// When a version is taken out of the split.
#[derive(Clone, Debug, PartialEq)]
pub struct Guard {
    pub version: i64,
    pub max_error_rate: Option<f64>,
    pub min_agreement: Option<f64>,
    pub window_s: u32,
    pub min_requests: u64,
}

/// The longest guard window, in seconds.
pub const MAX_WINDOW_S: u32 = 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowText {
    target: TargetText,
    #[serde(default)]
    percent: Option<f64>,
    #[serde(default)]
    compare: Option<CompareText>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetText {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    version: Option<Version>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareText {
    #[serde(default)]
    atol: Option<f64>,
    #[serde(default)]
    rtol: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardText {
    version: Version,
    #[serde(default)]
    max_error_rate: Option<f64>,
    #[serde(default)]
    min_agreement: Option<f64>,
    #[serde(default)]
    window_s: Option<u32>,
    #[serde(default)]
    min_requests: Option<u64>,
}

/// A version as YAML gives it: `2`, `"2"` or `""` (none).
#[derive(Deserialize)]
#[serde(untagged)]
enum Version {
    Number(i64),
    Text(String),
}

impl Version {
    fn read(self, key: &str) -> Result<Option<i64>, String> {
        let text = match self {
            Self::Number(n) => n.to_string(),
            Self::Text(s) if s.trim().is_empty() => return Ok(None),
            Self::Text(s) => s,
        };
        match text.trim().parse::<i64>() {
            Ok(v) if v >= 1 => Ok(Some(v)),
            _ => Err(format!(
                "{key}: expected a version number (1 or more), found '{text}'"
            )),
        }
    }
}

/// Reads a `T` from a map and checks it with `check`, inside the map's own visit (so an
/// error carries the map's position, not its parent's).
fn checked<'de, D, T, U>(
    d: D,
    what: &'static str,
    check: fn(T) -> Result<U, String>,
) -> Result<U, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Checked<T, U>(fn(T) -> Result<U, String>, &'static str);
    impl<'de, T: Deserialize<'de>, U> Visitor<'de> for Checked<T, U> {
        type Value = U;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.1)
        }
        fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<U, M::Error> {
            let text = T::deserialize(MapAccessDeserializer::new(map))?;
            (self.0)(text).map_err(M::Error::custom)
        }
    }
    d.deserialize_map(Checked(check, what))
}

pub fn shadow<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Shadow>, D::Error> {
    checked(d, "a map with target, percent and compare", check_shadow).map(Some)
}

pub fn guard<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Guard>, D::Error> {
    checked(
        d,
        "a map with version, max_error_rate, min_agreement, window_s, min_requests",
        check_guard,
    )
    .map(Some)
}

fn check_shadow(text: ShadowText) -> Result<Shadow, String> {
    let model = match text.target.model {
        Some(m) if m.trim().is_empty() => None,
        Some(m) => Some(m),
        None => None,
    };
    let version = match text.target.version {
        Some(v) => v.read("target.version")?,
        None => None,
    };
    let percent = text.percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("percent: expected 0 to 100, found {percent}"));
    }
    let compare = text.compare.unwrap_or(CompareText {
        atol: None,
        rtol: None,
    });
    let tolerance = Tolerance {
        atol: compare.atol.unwrap_or(1e-8),
        rtol: compare.rtol.unwrap_or(1e-5),
    };
    for (key, v) in [
        ("compare.atol", tolerance.atol),
        ("compare.rtol", tolerance.rtol),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{key}: expected a number, 0 or more, found {v}"));
        }
    }
    Ok(Shadow {
        model,
        version,
        per_10k: (percent * 100.0).round() as u32,
        tolerance,
    })
}

fn check_guard(text: GuardText) -> Result<Guard, String> {
    let version = text
        .version
        .read("version")?
        .ok_or("version: expected the version to guard, found \"\"")?;
    for (key, v) in [
        ("max_error_rate", text.max_error_rate),
        ("min_agreement", text.min_agreement),
    ] {
        if let Some(v) = v.filter(|v| !(0.0..=1.0).contains(v)) {
            return Err(format!("{key}: expected a fraction from 0 to 1, found {v}"));
        }
    }
    if text.max_error_rate.is_none() && text.min_agreement.is_none() {
        return Err(
            "expected max_error_rate, min_agreement or both: a guard with neither never trips"
                .into(),
        );
    }
    let window_s = text.window_s.unwrap_or(30);
    if !(1..=MAX_WINDOW_S).contains(&window_s) {
        return Err(format!(
            "window_s: expected 1 to {MAX_WINDOW_S} seconds, found {window_s}"
        ));
    }
    let min_requests = text.min_requests.unwrap_or(100);
    if min_requests == 0 {
        return Err("min_requests: expected 1 or more, found 0".into());
    }
    Ok(Guard {
        version,
        max_error_rate: text.max_error_rate,
        min_agreement: text.min_agreement,
        window_s,
        min_requests,
    })
}
