//! A request body read whole, bounded: counted against the byte budget as its bytes
//! arrive (never from what Content-Length claims), refused past the largest message, and
//! refused when it stalls.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::{Code, Status};

use crate::{
    admission::{body::Limits, BytesPermit},
    reason, Reason,
};

/// The body, and the budget it holds until the request has been handed on.
pub struct Read {
    pub bytes: Bytes,
    pub permit: Option<BytesPermit>,
}

pub async fn read(mut body: hyper::body::Incoming, limits: &Limits) -> Result<Read, Status> {
    use http_body::Body as _;
    let mut buf = BytesMut::new();
    let mut permit: Option<BytesPermit> = None;
    // The gRPC door's stall rule: each `stall` window must bring its share of the bytes
    // still to come (any byte, or --grpc-min-receive-rate x the window), so a body
    // trickled a byte at a time cannot hold its bytes for long.
    let mut window = tokio::time::Instant::now() + limits.stall;
    let mut got_in_window = 0usize;
    let timer = tokio::time::sleep_until(window);
    tokio::pin!(timer);
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = &mut timer, if !limits.stall.is_zero() => {
                let left = body.size_hint().exact().map_or(usize::MAX, |n| n as usize);
                if got_in_window < limits.window_need().min(left) {
                    return Err(too_slow(limits, got_in_window, buf.len()));
                }
                window += limits.stall;
                timer.as_mut().reset(window);
                got_in_window = 0;
                continue;
            }
        };
        let Some(frame) = frame else { break };
        let frame =
            frame.map_err(|e| Status::cancelled(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > limits.max_message {
            return Err(too_large("request body larger", limits));
        }
        let more = limits.budget.acquire(data.len()).map_err(Status::from)?;
        match permit.as_mut() {
            Some(p) => p.absorb(more),
            None => permit = Some(more),
        }
        got_in_window += data.len();
        buf.extend_from_slice(&data);
    }
    Ok(Read {
        bytes: buf.freeze(),
        permit,
    })
}

fn too_large(what: &str, limits: &Limits) -> Status {
    reason::status(
        Code::ResourceExhausted,
        format!(
            "{what} than the largest message, {} bytes ({})",
            limits.max_message, limits.max_message_is
        ),
        Reason::OverBudget,
    )
}

fn too_slow(limits: &Limits, got: usize, total: usize) -> Status {
    let t = limits.stall;
    let message = match got {
        0 => format!(
            "the request body stalled: no bytes for {t:?} after {total} bytes (--grpc-stall-timeout)"
        ),
        _ => format!(
            "the request body is arriving too slowly: {got} bytes in the last {t:?}, below --grpc-min-receive-rate {} bytes/s ({total} bytes of it received)",
            limits.min_rate
        ),
    };
    reason::status(Code::DeadlineExceeded, message, Reason::Deadline)
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
pub fn inflate(read: Read, encoding: Encoding, limits: &Limits) -> Result<Read, Status> {
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
        if out.len() + n > limits.max_message {
            return Err(too_large("the request body inflates to more", limits));
        }
        let more = limits.budget.acquire(n).map_err(Status::from)?;
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
