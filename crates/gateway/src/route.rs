//! Route: what serves a request — the model, the version selector, the concrete version
//! and the routing policy — decided once per request from what the workers last said,
//! before any worker is picked (`balance` picks one for the target). The policy is per
//! model, from the routing file (`routes`): a weighted split over versions for requests
//! that name none, and hedging; a model without an entry has the default.

use std::{collections::BTreeSet, sync::Arc};

use infermesh_core::{text::clip, Error, Reason};

use crate::{
    endpoint::{Endpoint, Seen},
    routes::{
        split::{Drawn, Split},
        After, Records,
    },
};

/// How requests for a model are handled once routed.
#[derive(Debug)]
pub struct Policy {
    /// Try another worker after a failure that did not answer about the request itself.
    pub retry: bool,
    /// A request whose worker connection broke this many times is refused from then on
    /// (a query of death; see `poison`).
    pub max_breaks: u32,
    /// Versions by weight for requests that name none (else: the newest ready one).
    pub split: Option<Split>,
    /// When to send a second copy to another worker if the first has not answered.
    pub hedge: Option<After>,
    /// A copy of answered requests to a shadow target, answers compared.
    pub shadow: Option<crate::shadow::Rule>,
    /// Takes a version out of the split when it errs or disagrees too often.
    pub guard: Option<crate::guard::Guard>,
    /// Copies on placement-mode workers: at least `min` kept loaded, at most `max` by load.
    pub copies: crate::routes::file::Copies,
    pub records: Records,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            retry: true,
            max_breaks: crate::poison::MAX_BREAKS,
            split: None,
            hedge: None,
            shadow: None,
            guard: None,
            copies: Default::default(),
            records: Records::default(),
        }
    }
}

/// Which version a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    /// This version and no other.
    Named(i64),
    /// None named: the newest version a ready worker has.
    Newest,
    /// None named, and the model's split drew the version.
    Split,
}

impl Selector {
    /// As the client wrote it ("" for none), for messages.
    pub fn asked(self) -> String {
        match self {
            Self::Named(v) => v.to_string(),
            Self::Newest | Self::Split => String::new(),
        }
    }
}

/// Where a request goes, decided once per request: the model, the version selector, the
/// concrete version it resolved to, and the model's policy.
#[derive(Clone, Debug)]
pub struct Target {
    pub model: String,
    pub selector: Selector,
    pub version: i64,
    pub policy: Arc<Policy>,
}

/// Reads the version a client asked for: "" is none, anything else must be a number.
pub fn selector(model: &str, version: &str) -> Result<Selector, Error> {
    if version.is_empty() {
        return Ok(Selector::Newest);
    }
    version.parse().map(Selector::Named).map_err(|_| {
        Error::InvalidArgument(format!(
            "model '{}': version '{}' is not a number",
            clip(model),
            clip(version)
        ))
    })
}

/// Resolves `(model, version)` over the workers: version "" is the model's split's draw
/// when the routing file has one, else the newest version any ready worker has, so a
/// rollout moves traffic as soon as one worker has the new one.
pub fn route(
    workers: &[Arc<Endpoint>],
    model: &str,
    version: &str,
    policy: &Arc<Policy>,
) -> Result<Target, Error> {
    let selector = selector(model, version)?;
    let want = match (selector, &policy.split) {
        (Selector::Named(v), _) => Some(v),
        (_, Some(split)) => return drawn(workers, model, split, policy),
        _ => workers.iter().filter_map(|e| e.newest(model)).max(),
    };
    match want {
        Some(version) => Ok(Target {
            model: model.to_string(),
            selector,
            version,
            policy: policy.clone(),
        }),
        None => Err(no_worker(workers, model, version)),
    }
}

/// The split's draw for a request that named no version; counted by version and result.
fn drawn(
    workers: &[Arc<Endpoint>],
    model: &str,
    split: &Split,
    policy: &Arc<Policy>,
) -> Result<Target, Error> {
    let ready = |v: i64| workers.iter().any(|e| e.serves(model, Some(v)));
    let count = |v: i64, result: usize| {
        if let Some(i) = split.weights.iter().position(|(w, _)| *w == v) {
            if let Some(series) = policy.records.split.get(i) {
                series[result].inc();
            }
        }
    };
    let version = match split.draw(ready) {
        Drawn::Version(v) => {
            count(v, 0);
            v
        }
        Drawn::Fallback { to, .. } => {
            count(to, 1);
            to
        }
        Drawn::Unavailable(v) => {
            count(v, 2);
            return Err(version_unavailable(workers, model, v, split));
        }
    };
    Ok(Target {
        model: model.to_string(),
        selector: Selector::Split,
        version,
        policy: policy.clone(),
    })
}

/// The drawn version has no ready worker and the split does not fall back.
fn version_unavailable(
    workers: &[Arc<Endpoint>],
    model: &str,
    version: i64,
    split: &Split,
) -> Error {
    let weight = split
        .weights
        .iter()
        .find(|(v, _)| *v == version)
        .map_or(0, |(_, w)| *w);
    let why = no_worker(workers, model, &version.to_string());
    let fallback = if split.fallback {
        "no other version of the split has one either"
    } else {
        "its share is not moved to another version without `fallback: true`"
    };
    Error::Unavailable(format!(
        "model '{}' version {version} (weight {weight} of {} in the routing file's split) has no ready worker; {fallback}: {}",
        clip(model),
        split.total(),
        why
    ))
    .because(Reason::VersionUnavailable)
}

/// For a request that named no version, once no worker is left for its version: the
/// newest other version a ready worker has (a split's next version by weight, only with
/// `fallback`), leaving out `without` (the versions already given up on). A named version
/// is never exchanged for another: `None`.
pub fn reroute(workers: &[Arc<Endpoint>], target: &Target, without: &[i64]) -> Option<Target> {
    let version = match (target.selector, &target.policy.split) {
        (Selector::Named(_), _) => return None,
        (Selector::Split, Some(split)) => {
            let v = split.other(without, |v| {
                workers.iter().any(|e| e.serves(&target.model, Some(v)))
            })?;
            if let Some(i) = split.weights.iter().position(|(w, _)| *w == v) {
                target.policy.records.split[i][1].inc();
            }
            v
        }
        _ => workers
            .iter()
            .filter_map(|e| e.newest_except(&target.model, without))
            .max()?,
    };
    Some(Target {
        version,
        ..target.clone()
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::fakes;

    fn asked(workers: &[Arc<Endpoint>], version: &str) -> Result<Target, Error> {
        route(workers, "m", version, &Default::default())
    }

    #[tokio::test]
    async fn none_named_is_the_newest_ready_version_anywhere_and_a_named_one_is_kept() {
        let mut ws = fakes(1, 1, &[("m", &[1, 2])]);
        ws.extend(fakes(2, 1, &[("m", &[1, 3])]));
        let t = asked(&ws, "").unwrap();
        assert_eq!((t.selector, t.version), (Selector::Newest, 3));
        let t = asked(&ws, "1").unwrap();
        assert_eq!((t.selector, t.version), (Selector::Named(1), 1));
        // A named version is routed even where no worker has it yet: balance finds none,
        // and the answer names what each worker has.
        assert_eq!(asked(&ws, "7").unwrap().version, 7);
        let err = asked(&ws, "x").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("version 'x'"), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_model_is_not_found_and_unready_workers_make_it_unavailable() {
        let ws = fakes(1, 2, &[("m", &[1])]);
        let err = route(&ws, "other", "", &Default::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        ws.iter().for_each(|e| e.mark_unready("draining".into()));
        let err = asked(&ws, "").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.to_string().contains("'m'") && err.to_string().contains("127.0.0.1:9 (draining)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rerouting_leaves_out_given_up_versions_and_never_changes_a_named_one() {
        let ws = fakes(1, 2, &[("m", &[1, 2, 3])]);
        let newest = asked(&ws, "").unwrap();
        assert_eq!(newest.version, 3);
        let next = reroute(&ws, &newest, &[3]).unwrap();
        assert_eq!((next.selector, next.version), (Selector::Newest, 2));
        assert_eq!(reroute(&ws, &next, &[3, 2]).unwrap().version, 1);
        assert!(reroute(&ws, &next, &[3, 2, 1]).is_none(), "nothing left");
        let named = asked(&ws, "3").unwrap();
        assert!(
            reroute(&ws, &named, &[3]).is_none(),
            "a named version stays named"
        );
    }

    fn split(weights: &[(i64, u32)], fallback: bool) -> Arc<Policy> {
        Arc::new(Policy {
            split: Some(Split::new(weights.to_vec(), fallback)),
            records: Records {
                split: weights.iter().map(|_| Default::default()).collect(),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_split_draws_versions_by_weight_and_never_moves_a_named_or_unready_one() {
        let ws = fakes(1, 2, &[("m", &[1, 2])]);
        let policy = split(&[(1, 1), (2, 1), (3, 2)], false);
        let mut drawn = Vec::new();
        for _ in 0..4 {
            match route(&ws, "m", "", &policy) {
                Ok(t) => drawn.push((t.selector == Selector::Split, t.version)),
                Err(e) => {
                    assert_eq!(e.reason(), Reason::VersionUnavailable, "{e}");
                    assert!(e.to_string().contains("version 3 (weight 2 of 4"), "{e}");
                    drawn.push((false, 3));
                }
            }
        }
        drawn.sort();
        assert_eq!(drawn, [(false, 3), (false, 3), (true, 1), (true, 2)]);
        assert_eq!(policy.records.split[2][2].get(), 2, "counted unavailable");
        assert_eq!(
            route(&ws, "m", "3", &policy).unwrap().selector,
            Selector::Named(3)
        );
        let t = route(&ws, "m", "", &split(&[(1, 1)], false)).unwrap();
        assert!(
            reroute(&ws, &t, &[1]).is_none(),
            "no fallback: the share is not moved"
        );
        let fallback = split(&[(1, 1), (2, 1), (3, 2)], true);
        for _ in 0..8 {
            let t = route(&ws, "m", "", &fallback).unwrap();
            assert!(matches!(t.version, 1 | 2));
            assert_eq!(
                reroute(&ws, &t, &[t.version]).unwrap().version,
                3 - t.version
            );
        }
    }
}
