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

    /// One model version's series, resolved once at its load.
    pub fn of(&self, model: &str, version: i64) -> ModelSequenceMetrics {
        let labels = ModelLabels {
            model: model.into(),
            version: version.to_string(),
        };
        let ended = |how: How| {
            self.ended
                .get_or_create(&EndLabels {
                    model: labels.model.clone(),
                    version: labels.version.clone(),
                    how: how.as_str().into(),
                })
                .clone()
        };
        ModelSequenceMetrics {
            active: self.active.get_or_create(&labels).clone(),
            state_bytes: self.state_bytes.get_or_create(&labels).clone(),
            waiting: self.waiting.get_or_create(&labels).clone(),
            ended: [How::End, How::Idle, How::Restart, How::Unload].map(ended),
        }
    }
}

/// How a sequence ended (the `how` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    End = 0,
    Idle = 1,
    Restart = 2,
    Unload = 3,
}

impl How {
    fn as_str(self) -> &'static str {
        match self {
            How::End => "end",
            How::Idle => "idle",
            How::Restart => "restart",
            How::Unload => "unload",
        }
    }
}

/// A model version's sequence series.
#[derive(Clone, Debug)]
pub struct ModelSequenceMetrics {
    pub active: Gauge,
    pub state_bytes: Gauge,
    pub waiting: Gauge,
    ended: [Counter; 4],
}

impl ModelSequenceMetrics {
    pub fn ended(&self, how: How) {
        self.ended[how as usize].inc();
    }
}
