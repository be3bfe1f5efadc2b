//! gRPC statuses as HTTP answers: one table (docs/http.md), the message as
//! `{"error": "..."}` (what Triton's clients read), and the reason both in the body
//! (`"reason"`) and in the `infermesh-reason` header, so a client reads it without
//! parsing text.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use tonic::{Code, Status};

use super::Response;

/// The header that carries a failure's reason.
pub const REASON_HEADER: &str = "infermesh-reason";

/// The HTTP status a gRPC code answers with.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // nginx's "client closed request": the client went away or cancelled.
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failure as an HTTP answer.
pub fn error(status: &Status) -> Response {
    let reason = crate::reason::of_status(status).map(|r| r.as_str());
    let mut body = serde_json::json!({"error": status.message()});
    if let Some(r) = reason {
        body["reason"] = r.into();
    }
    let mut resp = json(http_status(status.code()), body.to_string().into_bytes());
    if let Some(r) = reason {
        resp.headers_mut()
            .insert(REASON_HEADER, http::HeaderValue::from_static(r));
    }
    resp
}

/// A JSON answer.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_status_and_the_reason_travels() {
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::Cancelled), 499);
        assert_eq!(http_status(Code::DeadlineExceeded), 504);
        let s = crate::reason::status(Code::Unavailable, "draining", crate::Reason::Draining);
        let r = error(&s);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[REASON_HEADER], "draining");
    }
}
