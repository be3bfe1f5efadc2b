//! `infermesh_sequences_*`: a stateful model's active sequences, the bytes their state
//! holds, and how sequences ended.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::metrics::ModelLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub model: String,
    pub version: String,
    /// `end` (sequence_end), `idle` (max_sequence_idle_microseconds passed), `restart`
    /// (a sequence_start for an active id), `unload`.
    pub how: String,
}

#[derive(Clone, Debug, Default)]
pub struct SequenceMetrics {
    pub active: Family<ModelLabels, Gauge>,
    pub state_bytes: Family<ModelLabels, Gauge>,
    pub waiting: Family<ModelLabels, Gauge>,
    pub ended: Family<EndLabels, Counter>,
}

impl SequenceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("infermesh_sequences");
        r.register(
            "active",
            "Sequences holding a slot of a stateful model (sequence_batching)",
            m.active.clone(),
        );
        r.register(
            "state_bytes",
            "Bytes of implicit state the worker keeps for active sequences (counted against --max-inflight-bytes)",
            m.state_bytes.clone(),
        );
        r.register(
            "waiting",
            "New sequences waiting for a free slot",
            m.waiting.clone(),
        );
        r.register(
            "ended",
            "Sequences that ended, by how: end (sequence_end), idle (released after max_sequence_idle_microseconds), restart (a new sequence_start on its id), unload",
            m.ended.clone(),
        );
        m
    }
}
