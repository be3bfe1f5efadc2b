//! What a failed attempt means for the request and for the worker, read from data: the
//! status code, the reason the worker attached (`infermesh_core::reason`), and the typed
//! errors under a status (a broken connection carries its transport error as source).
//! Never from a message's wording — except where tonic itself says a transport failure
//! only in words, which [`tonic_says_transport`] holds in one place, pinned by a test.

use infermesh_core::{reason, Reason};
use tonic::{Code, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The model (or version) is not served by this worker now: take it off this worker
    /// until its next poll, and try another.
    ModelGone,
    /// The worker is busy (queue full, over a byte budget): try another; its load estimate
    /// already steers traffic away, nothing to mark.
    Busy,
    /// The worker refuses everything (draining, or a server that gives no reason): out of
    /// rotation until its next good poll; try another.
    Refusing,
    /// The connection to the worker failed: eject it for a backoff; try another.
    Broken,
    /// The attempt outlived its per-attempt bound (the worker stopped answering, or its
    /// link did): cancelled there; try another. Several in a row eject the worker.
    TimedOut,
    /// The attempt used up its half of a client deadline too short for the worker's
    /// usual time: try another; nothing is held against the worker.
    OutOfTime,
    /// An answer about the request itself (invalid, deadline, engine failure): final.
    Final,
}

impl Failure {
    /// Inference is idempotent: whatever did not answer about the request itself may be
    /// tried on another worker, while the deadline and the retry budget allow.
    pub fn retryable(self) -> bool {
        self != Self::Final
    }
}

pub fn classify(status: &Status) -> Failure {
    if transport(status) {
        return Failure::Broken;
    }
    match reason::of_status(status) {
        Some(Reason::ModelNotFound | Reason::VersionNotFound | Reason::ModelNotReady) => {
            Failure::ModelGone
        }
        Some(Reason::QueueFull | Reason::OverBudget) => Failure::Busy,
        // A gateway's own stream to its worker ended under the request (a downstream
        // gateway's, or ours): like a worker that gives no reason.
        Some(Reason::Draining | Reason::Unreachable) => Failure::Refusing,
        Some(_) => Failure::Final,
        // A server that sends no reason (Triton, an older worker): the code alone.
        None => match status.code() {
            Code::NotFound => Failure::ModelGone,
            Code::ResourceExhausted => Failure::Busy,
            Code::Unavailable => Failure::Refusing,
            _ => Failure::Final,
        },
    }
}

/// UNAVAILABLE with `worker-unreachable`: a worker's connection broke, or its stream
/// ended, with the request on it. Also what the client is told when it is left with an
/// attempt whose connection failed, whatever code the transport gave it (tonic says some
/// of these as UNKNOWN or CANCELLED, which would read as the request's fault).
pub fn unreachable(message: String) -> Status {
    reason::status(Code::Unavailable, message, Reason::Unreachable)
}

/// Whether the status is a failure of the connection rather than an answer from the
/// worker: statuses built from transport errors carry them as source; a status decoded
/// from the wire never has one.
pub fn transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some() || tonic_says_transport(status)
}

/// tonic reports some connection failures with no source, only in words: a call whose
/// connection's dispatcher went away ("operation was canceled") or that failed in the
/// transport ("transport error"). The gateway never cancels a call it still waits on, so
/// these are the worker's connection.
fn tonic_says_transport(status: &Status) -> bool {
    let msg = status.message();
    match status.code() {
        Code::Unknown => msg.contains("transport error"),
        Code::Cancelled => msg.contains("operation was canceled"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_decide_and_words_do_not() {
        let with = |code, reason| reason::status(code, "whatever the words say", reason);
        assert_eq!(
            classify(&with(Code::NotFound, Reason::ModelNotFound)),
            Failure::ModelGone
        );
        assert_eq!(
            classify(&with(Code::NotFound, Reason::VersionNotFound)),
            Failure::ModelGone
        );
        assert_eq!(
            classify(&with(Code::Unavailable, Reason::ModelNotReady)),
            Failure::ModelGone
        );
        assert_eq!(
            classify(&with(Code::Unavailable, Reason::Draining)),
            Failure::Refusing
        );
        assert_eq!(
            classify(&with(Code::Unavailable, Reason::Unreachable)),
            Failure::Refusing
        );
        assert_eq!(
            classify(&with(Code::ResourceExhausted, Reason::QueueFull)),
            Failure::Busy
        );
        assert_eq!(
            classify(&with(Code::ResourceExhausted, Reason::OverBudget)),
            Failure::Busy
        );
        for r in [
            Reason::Invalid,
            Reason::Deadline,
            Reason::Engine,
            Reason::CancelledAfterRun,
        ] {
            assert_eq!(classify(&with(Code::Internal, r)), Failure::Final, "{r}");
        }
        // Words that once decided, with a reason that says otherwise: the reason wins.
        let s = with(Code::Unavailable, Reason::Draining);
        let reworded = Status::with_details(
            s.code(),
            "model 'm' transport connect",
            s.details().to_vec().into(),
        );
        assert_eq!(classify(&reworded), Failure::Refusing);
        // No reason at all: the code.
        assert_eq!(classify(&Status::unavailable("x")), Failure::Refusing);
        assert_eq!(
            classify(&Status::invalid_argument("transport error")),
            Failure::Final
        );
    }

    #[test]
    fn a_status_with_a_source_is_the_connection() {
        let mut s = Status::unavailable("anything");
        assert_eq!(classify(&s), Failure::Refusing);
        s.set_source(std::sync::Arc::new(std::io::Error::other("reset")));
        assert_eq!(classify(&s), Failure::Broken);
    }

    /// Pins tonic's own wording and typing for a connection that cannot be made: if a
    /// tonic upgrade changes either, this fails rather than routing silently changing.
    #[tokio::test]
    async fn tonic_connection_failures_are_classified_broken() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let mut client =
            infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(
                channel,
            );
        let status = client
            .server_ready(infermesh_proto::ServerReadyRequest {})
            .await
            .unwrap_err();
        assert_eq!(classify(&status), Failure::Broken, "{status:?}");
        assert!(transport(&status));
        assert!(tonic_says_transport(&Status::unknown("transport error")));
        assert!(tonic_says_transport(&Status::cancelled(
            "operation was canceled"
        )));
    }
}
