//! Following a worker's change stream (`infermesh.placement.v1.Placement/Watch`): what
//! it holds — every model version with its state, measured size and use, and its memory
//! — as the worker reports each change, instead of polling its repository index. While
//! the stream is open it decides the worker's ready models; the poll keeps only
//! readiness. A worker without the service (Triton, an older worker) is polled as before.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt;
use infermesh_proto::placement::{placement_client::PlacementClient, ModelVersion, WatchRequest};

use super::{Endpoint, Seen};

/// What a worker's change stream said it holds.
#[derive(Clone, Debug, Default)]
pub struct Held {
    /// `--model-memory-bytes` in placement mode; 0 otherwise.
    pub capacity: u64,
    pub used: u64,
    /// Every version of each model, as the last message naming the model listed them.
    pub models: BTreeMap<String, Vec<ModelVersion>>,
    /// The last snapshot's sequence: a change at or below it is already in it.
    base: u64,
}

impl Held {
    /// Whether the worker loads models when asked (`--model-control-mode placement`).
    pub fn placing(&self) -> bool {
        self.capacity > 0
    }

    /// Takes one message of the stream; false when it was already in the last snapshot.
    pub fn apply(&mut self, msg: infermesh_proto::placement::WatchResponse) -> bool {
        if msg.snapshot {
            self.models.clear();
            self.base = msg.sequence;
        } else if msg.sequence <= self.base {
            return false;
        }
        if let Some(m) = msg.memory {
            self.capacity = m.capacity_bytes;
            self.used = m.used_bytes;
        }
        // A change lists every version of each model it names: they replace that
        // model's entries.
        let mut named: BTreeMap<String, Vec<ModelVersion>> = BTreeMap::new();
        for v in msg.models {
            named.entry(v.name.clone()).or_default().push(v);
        }
        self.models.extend(named);
        true
    }

    /// The ready versions, every model, and every numbered version, as `Seen` keeps them.
    fn fill_seen(&self, seen: &mut Seen) {
        seen.models.clear();
        seen.known.clear();
        seen.versions.clear();
        for (name, versions) in &self.models {
            seen.known.insert(name.clone());
            for v in versions {
                seen.list(name, &v.version, &v.state);
            }
        }
    }
}

/// How a follow ended.
pub enum Followed {
    /// The worker has no change stream: poll it.
    Unimplemented,
    /// The stream broke or ended (the worker went away): try again later.
    Ended,
}

impl Endpoint {
    /// Follows the worker's change stream until it ends, keeping `seen` in step.
    pub(super) async fn follow(&self) -> Followed {
        let mut client = PlacementClient::new(self.channel.clone());
        let mut stream = match client.watch(WatchRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Followed::Unimplemented,
            Err(_) => return Followed::Ended,
        };
        let mut held = Held::default();
        while let Some(Ok(msg)) = stream.next().await {
            if !held.apply(msg) {
                continue;
            }
            let now = Arc::new(held.clone());
            self.store(|seen| {
                let mut seen = seen.clone();
                now.fill_seen(&mut seen);
                seen.held = Some(now.clone());
                seen
            });
        }
        // The poll decides again until the stream is back.
        self.store(|seen| Seen {
            held: None,
            ..seen.clone()
        });
        Followed::Ended
    }

    /// What a poll keeps while the stream is open: the models as the stream last said
    /// (undoing a model taken off after a failed call, as a full poll would).
    pub(super) fn models_from_stream(seen: &mut Seen, current: &Seen) -> bool {
        let Some(held) = &current.held else {
            return false;
        };
        held.fill_seen(seen);
        seen.held = Some(held.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use infermesh_proto::placement::{Memory, WatchResponse};

    use super::*;

    impl Held {
        /// The versions of `model` that are READY here.
        fn ready(&self, model: &str) -> BTreeSet<i64> {
            let mut seen = Seen::default();
            self.fill_seen(&mut seen);
            seen.models.remove(model).unwrap_or_default()
        }
    }

    fn version(name: &str, v: &str, state: &str) -> ModelVersion {
        ModelVersion {
            name: name.into(),
            version: v.into(),
            state: state.into(),
            ..Default::default()
        }
    }

    fn msg(snapshot: bool, sequence: u64, models: Vec<ModelVersion>) -> WatchResponse {
        WatchResponse {
            snapshot,
            sequence,
            models,
            memory: Some(Memory {
                capacity_bytes: 100,
                used_bytes: 10,
            }),
        }
    }

    #[test]
    fn changes_replace_a_models_versions_and_older_ones_are_skipped() {
        let mut held = Held::default();
        assert!(held.apply(msg(
            true,
            5,
            vec![version("a", "", "UNAVAILABLE"), version("b", "1", "READY")]
        )));
        assert!(held.placing());
        // Composed before the snapshot was taken: already in it.
        assert!(!held.apply(msg(false, 4, vec![version("b", "1", "UNAVAILABLE")])));
        assert_eq!(held.ready("b"), BTreeSet::from([1]));
        assert!(held.apply(msg(
            false,
            6,
            vec![version("a", "1", "READY"), version("a", "2", "LOADING")]
        )));
        assert_eq!(held.ready("a"), BTreeSet::from([1]));
        let mut seen = Seen::default();
        held.fill_seen(&mut seen);
        assert_eq!(seen.known, BTreeSet::from(["a".into(), "b".into()]));
        assert_eq!(seen.versions["a"], BTreeSet::from([1, 2]));
        assert_eq!(seen.models["a"], BTreeSet::from([1]));
        // Evicted: its entry is the model's own ("" version) alone again.
        assert!(held.apply(msg(false, 7, vec![version("a", "", "UNAVAILABLE")])));
        assert!(held.ready("a").is_empty());
        // A new snapshot replaces everything.
        assert!(held.apply(msg(true, 9, vec![version("c", "1", "READY")])));
        assert_eq!(held.models.keys().collect::<Vec<_>>(), ["c"]);
    }
}
