//! A request body read whole, bounded: counted against the byte budget as its bytes
//! arrive (never from what Content-Length claims), refused past the largest message, and
//! refused when it stalls.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::{Code, Status};

use crate::{admission::BytesPermit, reason, Reason};

/// The body, and the budget it holds until the request has been handed on.
pub struct Read {
    pub bytes: Bytes,
    pub permit: Option<BytesPermit>,
}

pub async fn read(mut body: hyper::body::Incoming, door: &super::Door) -> Result<Read, Status> {
    let mut buf = BytesMut::new();
    let mut permit: Option<BytesPermit> = None;
    loop {
        let next = body.frame();
        let frame = match door.stall {
            t if t.is_zero() => next.await,
            t => tokio::time::timeout(t, next)
                .await
                .map_err(|_| stalled(t, buf.len()))?,
        };
        let Some(frame) = frame else { break };
        let frame =
            frame.map_err(|e| Status::cancelled(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > door.max_message {
            return Err(reason::status(
                Code::ResourceExhausted,
                format!(
                    "request body larger than the largest message, {} bytes (--grpc-max-message-bytes)",
                    door.max_message
                ),
                Reason::OverBudget,
            ));
        }
        let more = door.budget.acquire(data.len()).map_err(Status::from)?;
        match permit.as_mut() {
            Some(p) => p.absorb(more),
            None => permit = Some(more),
        }
        buf.extend_from_slice(&data);
    }
    Ok(Read {
        bytes: buf.freeze(),
        permit,
    })
}

fn stalled(t: Duration, got: usize) -> Status {
    reason::status(
        Code::DeadlineExceeded,
        format!(
            "the request body stalled: no bytes for {t:?} after {got} bytes (--grpc-stall-timeout)"
        ),
        Reason::Deadline,
    )
}
