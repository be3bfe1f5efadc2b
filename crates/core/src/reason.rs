//! Why a request failed, as a machine-readable key beside the gRPC code: the gateway
//! (and any client) decides retries, ejection and counting from codes and these keys,
//! never from the wording of messages, which is for people. Unary calls carry the key in a
//! `google.rpc.ErrorInfo` (domain `infermesh`) in the status details; stream messages in
//! the `infermesh_reason` parameter beside `infermesh_status_code`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// ErrorInfo's domain for infermesh's reasons.
pub const DOMAIN: &str = "infermesh";
/// The stream-message parameter holding the reason.
pub const PARAM: &str = "infermesh_reason";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No model of that name here.
    ModelNotFound,
    /// The model is here, not that version.
    VersionNotFound,
    /// The model (version) is here but not ready: loading, failed, unloaded.
    ModelNotReady,
    /// The server is shutting down and takes no new requests.
    Draining,
    /// The model's queue is full.
    QueueFull,
    /// A byte or count limit (in-flight bytes, message size, models loaded).
    OverBudget,
    /// The request's deadline passed (or a stalled message timed out).
    Deadline,
    /// Cancelled before any work on it started.
    CancelledBeforeRun,
    /// Cancelled after an instance had started on it: the work was done for nothing.
    CancelledAfterRun,
    /// The engine failed (or a panic) while running it.
    Engine,
    /// The request itself is wrong: retrying it anywhere gives the same answer.
    Invalid,
    /// An identical request broke workers' connections: refused, never to be retried.
    Quarantined,
    /// The calling tenant is over one of its quotas (rate, concurrency, small calls).
    OverQuota,
    /// No worker answered: the connection to it broke, or its stream ended, while the
    /// request was on it. Nothing says the request is at fault: safe to retry.
    Unreachable,
    /// The routing file split requests over versions and the version this one drew has
    /// no ready worker (its share is not moved to another version without `fallback`).
    VersionUnavailable,
    /// (placement) A model load that would not fit the worker's model memory capacity,
    /// however much of it could be freed.
    OverCapacity,
    /// (placement) A model load that would fit only by evicting models used too recently
    /// (`--model-min-idle`).
    ChurnGuard,
    /// (gateway placement) Too many requests already wait for this model to be loaded
    /// (`--placement-queue`).
    PlacementQueueFull,
    /// (gateway) The worker that held this request's sequence is gone, and its state
    /// with it: the sequence must start again.
    SequenceLost,
    /// (worker) Every sequence slot of the model is taken and too many new sequences
    /// already wait for one.
    SequenceSlotsFull,
}

const ALL: [Reason; 20] = [
    Reason::ModelNotFound,
    Reason::VersionNotFound,
    Reason::ModelNotReady,
    Reason::Draining,
    Reason::QueueFull,
    Reason::OverBudget,
    Reason::Deadline,
    Reason::CancelledBeforeRun,
    Reason::CancelledAfterRun,
    Reason::Engine,
    Reason::Invalid,
    Reason::Quarantined,
    Reason::OverQuota,
    Reason::Unreachable,
    Reason::VersionUnavailable,
    Reason::OverCapacity,
    Reason::ChurnGuard,
    Reason::PlacementQueueFull,
    Reason::SequenceLost,
    Reason::SequenceSlotsFull,
];

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ModelNotFound => "model-not-found",
            Self::VersionNotFound => "version-not-found",
            Self::ModelNotReady => "model-not-ready",
            Self::Draining => "draining",
            Self::QueueFull => "queue-full",
            Self::OverBudget => "over-budget",
            Self::Deadline => "deadline",
            Self::CancelledBeforeRun => "cancelled-before-run",
            Self::CancelledAfterRun => "cancelled-after-run",
            Self::Engine => "engine",
            Self::Invalid => "invalid",
            Self::Quarantined => "quarantined",
            Self::OverQuota => "over-quota",
            Self::Unreachable => "worker-unreachable",
            Self::VersionUnavailable => "version-unavailable",
            Self::OverCapacity => "over-capacity",
            Self::ChurnGuard => "churn-guard",
            Self::PlacementQueueFull => "placement-queue-full",
            Self::SequenceLost => "sequence-lost",
            Self::SequenceSlotsFull => "sequence-slots-full",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The reason a failure with this code has when nothing more specific is known.
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::NotFound => Self::ModelNotFound,
            Code::Unavailable => Self::ModelNotReady,
            Code::ResourceExhausted => Self::QueueFull,
            Code::DeadlineExceeded => Self::Deadline,
            Code::Cancelled => Self::CancelledBeforeRun,
            Code::Internal | Code::Unknown | Code::DataLoss => Self::Engine,
            _ => Self::Invalid,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status carrying `reason` in its details.
pub fn status(code: Code, message: impl Into<String>, reason: Reason) -> Status {
    let details =
        ErrorDetails::with_error_info(reason.as_str(), DOMAIN, std::collections::HashMap::new());
    Status::with_error_details(code, message, details)
}

/// The reason a status carries, if it has one of ours (a Triton server sends none).
pub fn of_status(status: &Status) -> Option<Reason> {
    let info = status.get_details_error_info()?;
    (info.domain == DOMAIN)
        .then(|| Reason::parse(&info.reason))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_status_details() {
        for r in ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let s = status(Code::Unavailable, "anything", r);
            assert_eq!(of_status(&s), Some(r), "{r}");
            // Through the wire form (grpc-status-details-bin) as well.
            let wire = s.into_http::<()>();
            let back = Status::from_header_map(wire.headers()).unwrap();
            assert_eq!(of_status(&back), Some(r));
        }
        assert_eq!(of_status(&Status::unavailable("no details")), None);
    }
}
