//! The worker's errors and their one mapping to gRPC status.

use infermesh_core::{reason, text::cap_message, Reason};
use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A bad or unservable request; carries its own status code.
    #[error(transparent)]
    Request(#[from] infermesh_core::Error),
    /// A model (version) could not be loaded; reported in RepositoryIndex and logs.
    #[error("{0}")]
    Load(String),
    /// ONNX Runtime failed while running a request that passed validation.
    #[error("{0}")]
    Runtime(String),
    /// The worker cannot start (library missing, repository unreadable).
    #[error("{0}")]
    Startup(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Request(e) => e.into(),
            Error::Load(m) => {
                reason::status(Code::Unavailable, cap_message(m), Reason::ModelNotReady)
            }
            Error::Runtime(m) => reason::status(
                Code::Internal,
                cap_message(format!("inference failed: {m}")),
                Reason::Engine,
            ),
            Error::Startup(m) => reason::status(Code::Internal, cap_message(m), Reason::Engine),
        }
    }
}
