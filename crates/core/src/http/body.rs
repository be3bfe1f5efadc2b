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

/// How a request body is encoded (`Content-Encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

impl Encoding {
    /// The request's `Content-Encoding`; UNIMPLEMENTED for one not accepted.
    pub fn of(headers: &http::HeaderMap) -> Result<Self, Status> {
        let Some(v) = headers.get(http::header::CONTENT_ENCODING) else {
            return Ok(Self::Identity);
        };
        match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Ok("identity") | Ok("") => Ok(Self::Identity),
            Ok("gzip") | Ok("x-gzip") => Ok(Self::Gzip),
            Ok("deflate") => Ok(Self::Deflate),
            _ => Err(Status::unimplemented(format!(
                "Content-Encoding: expected gzip, deflate or identity, found {v:?}"
            ))),
        }
    }
}

/// The body inflated, its inflated bytes counted against the budget as they come and
/// capped at the largest message: a small bomb stops at the cap.
pub fn inflate(read: Read, encoding: Encoding, door: &super::Door) -> Result<Read, Status> {
    use std::io::Read as _;
    let mut decoder: Box<dyn std::io::Read> = match encoding {
        Encoding::Identity => return Ok(read),
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&read.bytes[..])),
        Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(&read.bytes[..])),
    };
    let mut out = Vec::new();
    let mut permit: Option<BytesPermit> = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = decoder.read(&mut chunk).map_err(|e| {
            Status::invalid_argument(format!("the {encoding:?} body does not inflate: {e}"))
        })?;
        if n == 0 {
            break;
        }
        if out.len() + n > door.max_message {
            return Err(reason::status(
                Code::ResourceExhausted,
                format!(
                    "the request body inflates to more than the largest message, {} bytes (--grpc-max-message-bytes)",
                    door.max_message
                ),
                Reason::OverBudget,
            ));
        }
        let more = door.budget.acquire(n).map_err(Status::from)?;
        match permit.as_mut() {
            Some(p) => p.absorb(more),
            None => permit = Some(more),
        }
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(Read {
        bytes: Bytes::from(out),
        permit,
    })
}

/// Whether the client takes `coding` answers (`Accept-Encoding`, q-values read).
pub fn accepts(headers: &http::HeaderMap, coding: &str) -> bool {
    headers
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            name.eq_ignore_ascii_case(coding) && q > 0.0
        })
}

/// `body` gzipped.
pub fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body).expect("writing to memory");
    enc.finish().expect("writing to memory")
}
