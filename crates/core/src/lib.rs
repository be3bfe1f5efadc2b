//! What the infermesh worker and gateway share: tensors and datatypes, request validation,
//! the error → gRPC status mapping, flags, health, logging, and `serve()` with its shutdown
//! sequence.

pub mod admission;
pub mod auth;
pub mod busy_poll;
pub mod config;
pub mod conn;
pub mod datatype;
pub mod deadline;
pub mod error;
pub mod frame;
pub mod health_guard;
pub mod hold;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod model_control;
pub mod panic;
pub mod precise;
pub mod process_metrics;
pub mod raw;
pub mod reason;
pub mod sequence;
pub mod serve;
pub mod stream;
pub mod telemetry;
pub mod tensor;
pub mod text;
pub mod tls;
pub mod trace;
pub mod unsupported;
pub mod watch;

pub use config::ServerArgs;
pub use datatype::DataType;
pub use error::{Error, Result};
pub use lifecycle::Lifecycle;
pub use reason::Reason;
pub use tensor::{Tensor, TensorData};

// For the macros (`unsupported_rpcs!`), so they work in any crate.
#[doc(hidden)]
pub use infermesh_proto as __proto;
#[doc(hidden)]
pub use tonic as __tonic;

/// How every binary ends: exit status 0, or 1 with the error on one line (its causes
/// joined by ": "), never a backtrace, whatever RUST_BACKTRACE says.
pub fn exit<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--version` of every binary: the package version and the git revision it was built
/// from ("unknown" when built without `.git` and without `INFERMESH_GIT_REV`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("INFERMESH_GIT_REV"),
    ")"
);

/// Unix time in milliseconds (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
