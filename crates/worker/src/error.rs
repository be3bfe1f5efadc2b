//! The worker's errors and their one mapping to gRPC status.

use infermesh_core::text::cap_message;
use tonic::Status;

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
            Error::Load(m) => Status::unavailable(cap_message(m)),
            Error::Runtime(m) => Status::internal(cap_message(format!("inference failed: {m}"))),
            Error::Startup(m) => Status::internal(cap_message(m)),
        }
    }
}
