//! The errors every infermesh server can answer with, and their one mapping to gRPC status.

use tonic::{Code, Status};

use crate::Reason;

/// A request-level failure. Each variant is one gRPC status code; the message names the
/// field, what was expected and what came.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    /// A failure with a reason more specific than its code's default ([`Reason::of_code`]).
    #[error("{1}")]
    Because(Reason, Box<Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Error::InvalidArgument(format!(...))` in one breath.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::Error::InvalidArgument(format!($($arg)*)) };
}

impl Error {
    /// The same failure, with a more specific reason.
    pub fn because(self, reason: Reason) -> Self {
        match self {
            Self::Because(_, inner) => Self::Because(reason, inner),
            e => Self::Because(reason, Box::new(e)),
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Self::Because(r, _) => *r,
            e => Reason::of_code(e.code()),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::Because(_, inner) => inner.code(),
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Unavailable(_) => Code::Unavailable,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        crate::reason::status(
            e.code(),
            crate::text::cap_message(e.to_string()),
            e.reason(),
        )
    }
}
