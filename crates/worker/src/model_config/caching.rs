//! `response_cache { enable: true }`, and who shares a model's cached answers.

use infermesh_proto as pb;

use crate::Error;

/// The model parameter that lets every tenant share a model's cached answers.
pub const SHARED: &str = "infermesh_response_cache_shared";

/// Whether a model's answers are cached, and with whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    Off,
    /// Each tenant's entries apart: a tenant never hits (or times) what another asked.
    PerTenant,
    /// One set of entries for every caller (`infermesh_response_cache_shared: "true"`).
    Shared,
}

pub fn caching(config: &pb::ModelConfig) -> Result<Caching, Error> {
    let enabled = config.response_cache.as_ref().is_some_and(|r| r.enable);
    let shared = match config.parameters.get(SHARED).map(|p| p.string_value.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Error::Load(format!(
                "parameters '{SHARED}': expected \"true\" or \"false\", found {other:?}"
            )))
        }
    };
    Ok(match (enabled, shared) {
        (false, true) => {
            return Err(Error::Load(format!(
                "parameters '{SHARED}' needs response_cache {{ enable: true }}"
            )))
        }
        (false, false) => Caching::Off,
        (true, false) => Caching::PerTenant,
        (true, true) => Caching::Shared,
    })
}
