//! Route: what serves a request — the model, the concrete version and the routing policy —
//! decided from what the workers last said, before any worker is picked (`balance` picks
//! one for the target). The policy is per model; every model has the default today, and
//! weights, shadow traffic and hedging will be settings of it.

use std::{collections::BTreeSet, sync::Arc};

use infermesh_core::{text::clip, Error, Reason};

use crate::endpoint::{Endpoint, Seen};

/// How requests for a model are handled once routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Try another worker after a failure that did not answer about the request itself.
    pub retry: bool,
    /// A request whose worker connection broke this many times is refused from then on
    /// (a query of death; see `poison`).
    pub max_breaks: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            retry: true,
            max_breaks: crate::poison::MAX_BREAKS,
        }
    }
}

/// Where a request goes: the model, the version to ask for, and its policy.
#[derive(Clone, Debug)]
pub struct Target {
    pub model: String,
    pub version: i64,
    pub policy: Arc<Policy>,
}

/// Resolves `(model, version)` over the workers: version "" is the newest version any ready
/// worker has, so a rollout moves traffic as soon as one worker has the new one.
pub fn route(
    workers: &[Arc<Endpoint>],
    model: &str,
    version: &str,
    policy: &Arc<Policy>,
) -> Result<Target, Error> {
    let want = if version.is_empty() {
        workers.iter().filter_map(|e| e.newest(model)).max()
    } else {
        Some(version.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "model '{}': version '{}' is not a number",
                clip(model),
                clip(version)
            ))
        })?)
    };
    match want {
        Some(version) => Ok(Target {
            model: model.to_string(),
            version,
            policy: policy.clone(),
        }),
        None => Err(no_worker(workers, model, version)),
    }
}

/// Why no worker can take a request for `(model, version)`, naming each worker's state:
/// NOT_FOUND when no worker lists the model (or the version) at all, else UNAVAILABLE.
pub fn no_worker(all: &[Arc<Endpoint>], model: &str, version: &str) -> Error {
    // One snapshot of what each worker said, for every judgement below.
    let seen: Vec<Seen> = all.iter().map(|e| e.seen()).collect();
    let lines: Vec<String> = all
        .iter()
        .zip(&seen)
        .map(|(e, s)| {
            let why = match (&s.problem, s.models.get(model)) {
                (Some(p), _) => p.clone(),
                (None, Some(v)) => format!("ready versions {v:?}"),
                (None, None) if s.known.contains(model) => "model not ready".into(),
                (None, None) => "does not have the model".into(),
            };
            format!("{} ({why})", e.addr)
        })
        .collect();
    let workers = if lines.is_empty() {
        "none".into()
    } else {
        lines.join(", ")
    };
    let model = clip(model);
    let answered = seen.iter().any(|s| s.ready);
    if !seen.iter().any(|s| s.known.contains(model.0)) && answered {
        return Error::NotFound(format!("unknown model '{model}'; workers seen: {workers}"));
    }
    let what = if version.is_empty() {
        String::new()
    } else {
        format!(" version {version}")
    };
    // A version no worker lists in any state is not coming: NOT_FOUND, not retryable.
    if let Ok(v) = version.parse::<i64>() {
        let listed = seen
            .iter()
            .any(|s| s.versions.get(model.0).is_some_and(|vs| vs.contains(&v)));
        if answered && !listed {
            let have: BTreeSet<i64> = seen
                .iter()
                .filter_map(|s| s.versions.get(model.0))
                .flatten()
                .copied()
                .collect();
            return Error::NotFound(format!(
                "model '{model}' has no version {v}; versions: {have:?}"
            ))
            .because(Reason::VersionNotFound);
        }
    }
    Error::Unavailable(format!(
        "no ready worker for model '{model}'{what}; workers seen: {workers}"
    ))
}
