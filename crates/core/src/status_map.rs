//! Status codes tonic picks that gRPC's convention does not.

use http::{HeaderValue, Response};

/// tonic's decoder answers a message over the size limit with OUT_OF_RANGE; gRPC's
/// convention (and Triton's clients) expect RESOURCE_EXHAUSTED. Unary calls fail before our
/// handler runs, so the status is rewritten on the way out.
const TOO_LARGE: &str = "message length too large";

pub fn message_too_large<B>(mut res: Response<B>) -> Response<B> {
    let headers = res.headers_mut();
    let too_large = headers.get("grpc-status").map(HeaderValue::as_bytes) == Some(b"11")
        && headers
            .get("grpc-message")
            // grpc-message is percent-encoded on the wire.
            .is_some_and(|m| {
                m.to_str()
                    .unwrap_or("")
                    .replace("%20", " ")
                    .contains(TOO_LARGE)
            });
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    res
}

/// The same mapping for a status met inside a stream's inbound messages.
pub fn map_status(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains(TOO_LARGE) {
        crate::reason::status(
            tonic::Code::ResourceExhausted,
            status.message(),
            crate::Reason::OverBudget,
        )
    } else {
        status
    }
}
