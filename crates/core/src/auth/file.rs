//! The auth file (`--auth-config`): tenants, their credentials, scopes, models and limits.
//!
//! ```yaml
//! tenants:
//!   - name: team-a
//!     keys: ["sha256:<hex of the bearer token>"]      # never the token itself
//!     subjects: ["system:serviceaccount:apps:frontend"] # JWT subjects that are this tenant
//!     scopes: [infer, read]                             # infer | read | admin
//!     models: [mlp, digits]                             # ["*"]: every model
//!     limits: {requests_per_second: 200, burst: 400, max_concurrent: 64, max_inflight_share: 0.5}
//! ```
//!
//! `scopes`, `models` and `limits` are required (`limits: {}` for none): a field left out
//! by mistake, or cut off in a half-written file, never widens access.

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Infer,
    Read,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Inference requests (each stream message counts) per second, refilled continuously.
    pub requests_per_second: Option<f64>,
    /// Requests that may come at once after a quiet time; default: one second's worth.
    pub burst: Option<u32>,
    /// Inference requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// The fraction of the server's request byte budget (`--max-inflight-bytes`) this
    /// tenant's requests may hold at once, counted from their first byte; default 0.5.
    pub max_inflight_share: Option<f64>,
    /// Calls that are not inference (metadata, config, index, statistics, readiness,
    /// control) per second, in a bucket of their own; default: 10 × requests_per_second
    /// (none when that is not set).
    pub small_calls_per_second: Option<f64>,
}

/// A tenant's share of the byte budget when its limits name none: one tenant may take
/// half, so it can never take all.
pub const DEFAULT_SHARE: f64 = 0.5;

impl Limits {
    pub fn share(&self) -> f64 {
        self.max_inflight_share.unwrap_or(DEFAULT_SHARE)
    }

    /// Whether `other` sets the same quotas (rate, burst, concurrency, small calls): the
    /// byte share is not part of it, it changes in place.
    pub fn same_quota(&self, other: &Limits) -> bool {
        (
            self.requests_per_second,
            self.burst,
            self.max_concurrent,
            self.small_calls_per_second,
        ) == (
            other.requests_per_second,
            other.burst,
            other.max_concurrent,
            other.small_calls_per_second,
        )
    }

    pub fn small_calls(&self) -> Option<f64> {
        self.small_calls_per_second
            .or(self.requests_per_second.map(|r| r * 10.0))
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
    pub scopes: Vec<Scope>,
    /// The models open to this tenant; `["*"]` for all.
    pub models: Vec<String>,
    pub limits: Limits,
}

impl TenantSpec {
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tenants: Vec<TenantSpec>,
}

/// A parsed and checked tenant: its keys as SHA-256 digests.
#[derive(Clone, Debug, PartialEq)]
pub struct Tenant {
    pub spec: TenantSpec,
    pub key_hashes: Vec<[u8; 32]>,
}

/// Parses the file's text; an error names the tenant and field and what was wrong.
pub fn parse(text: &str) -> Result<Vec<Tenant>, String> {
    let file: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut names = std::collections::HashSet::new();
    let mut tenants = Vec::new();
    for (i, spec) in file.tenants.into_iter().enumerate() {
        let at = format!("tenants[{i}] ({})", spec.name);
        if spec.name.is_empty() || spec.name.len() > 64 {
            return Err(format!("tenants[{i}].name: expected 1 to 64 characters"));
        }
        if !names.insert(spec.name.clone()) {
            return Err(format!("{at}.name: a tenant of this name comes earlier"));
        }
        let key_hashes = spec
            .keys
            .iter()
            .enumerate()
            .map(|(k, key)| {
                hex32(key.strip_prefix("sha256:").unwrap_or("")).ok_or_else(|| {
                    format!(
                        "{at}.keys[{k}]: expected 'sha256:' and 64 hex digits (`infermesh auth hash-key` prints one), got {} characters",
                        key.len()
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let l = &spec.limits;
        if l.requests_per_second
            .is_some_and(|r| !(r > 0.0 && r.is_finite()))
        {
            return Err(format!(
                "{at}.limits.requests_per_second: expected a number above 0"
            ));
        }
        if l.small_calls_per_second
            .is_some_and(|r| !(r > 0.0 && r.is_finite()))
        {
            return Err(format!(
                "{at}.limits.small_calls_per_second: expected a number above 0"
            ));
        }
        if l.burst == Some(0) || l.max_concurrent == Some(0) {
            return Err(format!(
                "{at}.limits: burst and max_concurrent must be at least 1"
            ));
        }
        if l.burst.is_some() && l.requests_per_second.is_none() {
            return Err(format!("{at}.limits.burst: needs requests_per_second"));
        }
        if l.max_inflight_share.is_some_and(|s| !(s > 0.0 && s <= 1.0)) {
            return Err(format!(
                "{at}.limits.max_inflight_share: expected a fraction above 0 and at most 1"
            ));
        }
        tenants.push(Tenant { spec, key_hashes });
    }
    Ok(tenants)
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The `sha256:<hex>` line for a bearer token, as the file holds it.
pub fn hash_key(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_parses_and_its_mistakes_are_named() {
        let key = hash_key("secret-a");
        let ok = format!(
            "tenants:\n  - name: team-a\n    keys: [\"{key}\"]\n    scopes: [infer, read]\n    models: [mlp]\n    limits: {{requests_per_second: 200, burst: 400, max_concurrent: 64}}\n"
        );
        let t = parse(&ok).unwrap();
        assert_eq!(t[0].spec.scopes, vec![Scope::Infer, Scope::Read]);
        assert_eq!(t[0].key_hashes.len(), 1);
        for (text, says) in [
            (
                "tenants:\n  - name: a\n    keys: [\"abc\"]\n    scopes: []\n    models: []\n    limits: {}\n",
                "tenants[0] (a).keys[0]",
            ),
            ("tenants:\n  - name: a\n    scopes: [infer]\n    limits: {}\n", "missing field `models`"),
            ("tenants:\n  - name: a\n    models: [\"*\"]\n    limits: {}\n", "missing field `scopes`"),
            ("tenants:\n  - name: a\n    scopes: [infer]\n    models: [\"*\"]\n", "missing field `limits`"),
            (
                "tenants:\n  - name: a\n    scopes: [root]\n",
                "unknown variant `root`",
            ),
            (
                "tenants:\n  - name: a\n    scopes: []\n    models: []\n    limits: {}\n  - name: a\n    scopes: []\n    models: []\n    limits: {}\n",
                "tenants[1] (a).name",
            ),
            (
                "tenants:\n  - name: a\n    scopes: []\n    models: []\n    limits: {burst: 3}\n",
                "needs requests_per_second",
            ),
            (
                "tenants:\n  - name: a\n    scopes: []\n    models: []\n    limits: {requests_per_second: -1}\n",
                "above 0",
            ),
            (
                "tenants:\n  - name: a\n    colour: red\n",
                "unknown field `colour`",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn hash_key_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
