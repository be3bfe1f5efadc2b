//! Byte accounting from the first byte: a request body wrapper that reads each message's
//! length from its framing (the gRPC 5-byte prefix; see [`Framing`]), refuses a declared
//! length over the message limit or over what is left of the byte budget before any of it
//! is buffered, counts the bytes against the budget as frames arrive, and releases them
//! when the message is complete (its decoded form is then counted by the handler until
//! answered). A message that stops arriving mid-way for the stall timeout, or arrives below
//! the minimum rate, is dropped, and its bytes with it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::{ByteBudget, BytesPermit};

/// The limits one class of calls shares (inference, or the small calls).
#[derive(Clone, Debug)]
pub struct Limits {
    pub budget: ByteBudget,
    /// Largest message.
    pub max_message: usize,
    /// What sets `max_message`, for messages: "--grpc-max-message-bytes".
    pub max_message_is: &'static str,
    /// A message that made no progress for this long is dropped.
    pub stall: Duration,
    /// Bytes per second a message in progress must keep up, measured over each `stall`
    /// window (0: any progress will do), so a body trickled a byte at a time cannot hold
    /// its bytes for long.
    pub min_rate: usize,
}

impl Limits {
    /// Bytes a message must receive in one stall window (at least 1).
    pub fn window_need(&self) -> usize {
        let per_window = (self.min_rate as f64 * self.stall.as_secs_f64()) as usize;
        per_window.max(1)
    }
}

/// Largest message of a small call (health, metadata, config, index, statistics, ready,
/// control, reflection): their messages are a few names long.
pub const SMALL_MESSAGE: usize = 8 << 10;
/// The byte pool small calls share on one port, apart from the inference budget: a flood
/// of them never takes the inference budget, and inference never fails a probe.
pub const SMALL_POOL: usize = 1 << 20;

/// The limits each class of calls on one port gets.
#[derive(Clone, Debug)]
pub struct Admission {
    /// ModelInfer and ModelStreamInfer; with auth, each tenant's share of it.
    pub inference: Limits,
    /// Every other call.
    pub small: Limits,
}

impl Admission {
    /// Small calls only (the health port): messages of at most `max_message` in a pool of
    /// `pool` bytes of their own.
    pub fn small_only(stall: Duration, min_rate: usize, max_message: usize, pool: usize) -> Self {
        let small = Limits {
            budget: ByteBudget::new(pool),
            max_message,
            max_message_is: "the limit for small calls (health, metadata, index)",
            stall,
            min_rate,
        };
        Self {
            inference: small.clone(),
            small,
        }
    }

    /// The limits an inference call is read under: with auth, the caller's share of the
    /// budget from its first byte.
    pub fn inference_for(&self, caller: Option<&crate::auth::Caller>) -> Limits {
        let mut limits = self.inference.clone();
        if let Some(caller) = caller {
            limits.budget = caller.share(&limits.budget);
        }
        limits
    }

    /// Inference with `inference`; small calls in a pool of their own.
    pub fn new(inference: Limits) -> Self {
        let mut me = Self::small_only(
            inference.stall,
            inference.min_rate,
            SMALL_MESSAGE,
            SMALL_POOL,
        );
        me.inference = inference;
        me
    }
}

/// Where a message's length comes from: the gRPC 5-byte prefix here; a door that speaks
/// another protocol (HTTP/REST: Content-Length, chunked framing) brings its own, and the
/// counting, budgets, stall and rate rules stay the same.
pub trait Framing: Default + Send + 'static {
    /// Takes header bytes of the current message from the front of `data`: how many it
    /// took and, once the header is complete, the payload length it declares.
    fn header(&mut self, data: &[u8]) -> (usize, Option<usize>);
    /// Header bytes of the current message seen so far (0: between messages).
    fn seen(&self) -> usize;
    /// Header bytes the current message may still need.
    fn header_left(&self) -> usize;
}

/// The gRPC length prefix: a compression flag and a u32 big-endian length.
#[derive(Debug, Default)]
pub struct GrpcPrefix {
    bytes: [u8; 5],
    len: usize,
}

impl Framing for GrpcPrefix {
    fn header(&mut self, data: &[u8]) -> (usize, Option<usize>) {
        let n = (5 - self.len).min(data.len());
        self.bytes[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        let declared = (self.len == 5).then(|| (&self.bytes[1..]).get_u32() as usize);
        (n, declared)
    }

    fn seen(&self) -> usize {
        self.len
    }

    fn header_left(&self) -> usize {
        5 - self.len
    }
}

/// Where the reader is in the current message.
#[derive(Debug, Default)]
struct Message<F> {
    framing: F,
    /// The header is complete: `left` payload bytes are still to come.
    counted: bool,
    left: usize,
    /// The bytes of this message that have arrived.
    held: Option<BytesPermit>,
}

type Waiting = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project_lite::pin_project! {
    /// A request body counted against the byte budget. A unary call over the budget is
    /// refused; a stream waits for room instead (HTTP/2 flow control holds its sender),
    /// so one client's burst never fails the other messages a stream carries.
    pub struct Counted<B, F = GrpcPrefix> {
        #[pin]
        inner: B,
        limits: Limits,
        stream: bool,
        msg: Message<F>,
        // A data frame read but not yet admitted: its stream waits for budget.
        parked: Option<Frame<Bytes>>,
        waiting: Option<Waiting>,
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        // Bytes received in the current stall window, and how many it needs.
        window: (usize, usize),
        failed: bool,
    }
}

impl<B, F: Framing> Counted<B, F> {
    /// `stream`: the body of a streaming call (waits for budget) rather than a unary call
    /// (refused at once).
    pub fn new(inner: B, limits: Limits, stream: bool) -> Self {
        Self {
            inner,
            limits,
            stream,
            msg: Message::default(),
            parked: None,
            waiting: None,
            stall: None,
            window: (0, 0),
            failed: false,
        }
    }
}

/// Why a frame was not admitted.
enum Refused {
    /// No room in the budget now.
    Budget,
    /// The message itself is refused.
    Status(Status),
}

impl<F: Framing> Message<F> {
    fn in_progress(&self) -> bool {
        self.framing.seen() > 0
    }

    /// Bytes of this message still to come.
    fn remaining(&self) -> usize {
        self.framing.header_left() + self.left
    }

    /// Accounts one data frame, all or nothing: its bytes are taken from the budget first,
    /// then split between the messages they belong to.
    fn feed(&mut self, mut data: &[u8], limits: &Limits, stream: bool) -> Result<(), Refused> {
        let limit = limits.budget.limit();
        if stream && limit > 0 && data.len() > limit {
            // It could never fit: waiting would be forever.
            return Err(Refused::Status(over_budget(limits)));
        }
        let mut frame = limits
            .budget
            .acquire(data.len())
            .map_err(|_| Refused::Budget)?;
        while !data.is_empty() {
            if !self.counted {
                let (n, declared) = self.framing.header(data);
                data = &data[n..];
                self.hold(frame.split_off(n));
                if let Some(declared) = declared {
                    // The rest of this frame is already taken; it counts as room for this message.
                    admit(declared, limits, stream, frame.bytes()).map_err(Refused::Status)?;
                    self.counted = true;
                    self.left = declared;
                    if declared == 0 {
                        *self = Message::default();
                    }
                }
                continue;
            }
            let n = self.left.min(data.len());
            self.left -= n;
            data = &data[n..];
            self.hold(frame.split_off(n));
            if self.left == 0 {
                *self = Message::default(); // complete: the decoder takes it from here
            }
        }
        Ok(())
    }

    fn hold(&mut self, part: BytesPermit) {
        match &mut self.held {
            Some(held) => held.absorb(part),
            None => self.held = Some(part),
        }
    }
}

/// A declared length is checked before any of the message is buffered. A unary call
/// larger than what is left of the budget is refused; a stream's message waits for room.
fn admit(declared: usize, limits: &Limits, stream: bool, taken: usize) -> Result<(), Status> {
    if declared > limits.max_message {
        return Err(over(format!(
            "message of {declared} bytes declared; the limit is {} bytes ({})",
            limits.max_message, limits.max_message_is
        )));
    }
    // A stream's message waits for room, unless it could never fit.
    let limit = limits.budget.limit();
    if stream && limit > 0 && declared > limit {
        return Err(over(format!(
            "message of {declared} bytes declared; {} is {limit} bytes in all",
            limits.budget.what()
        )));
    }
    if let (false, Some(left)) = (stream, limits.budget.left().map(|l| l + taken)) {
        if declared > left {
            return Err(over(format!(
                "message of {declared} bytes declared; only {left} bytes of {} are free (limit {})",
                limits.budget.what(),
                limits.budget.limit()
            )));
        }
    }
    Ok(())
}

fn over_budget(limits: &Limits) -> Status {
    over(format!(
        "request refused while arriving: {} bytes of requests are in flight and {} is {} bytes",
        limits.budget.in_flight(),
        limits.budget.what(),
        limits.budget.limit()
    ))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// RESOURCE_EXHAUSTED for a byte limit (reason `over-budget`, not `queue-full`).
fn over(message: String) -> Status {
    crate::reason::status(
        tonic::Code::ResourceExhausted,
        message,
        crate::Reason::OverBudget,
    )
}

impl<B, F: Framing> Body for Counted<B, F>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match this.parked.take() {
            Some(frame) => frame,
            None => match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    return stalled(
                        this.msg,
                        this.limits,
                        this.stall,
                        this.window,
                        this.failed,
                        cx,
                    )
                }
            },
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        loop {
            match this.msg.feed(data, this.limits, *this.stream) {
                Ok(()) => {
                    *this.waiting = None;
                    // Enough progress: the stall clock starts again (it runs only
                    // mid-message).
                    if this.stall.is_some() {
                        this.window.0 += data.len();
                        if this.window.0 >= this.window.1 {
                            *this.stall = None;
                        }
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Err(Refused::Status(status)) => {
                    *this.failed = true;
                    *this.msg = Message::default();
                    return Poll::Ready(Some(Err(status.into())));
                }
                Err(Refused::Budget) if !*this.stream => {
                    *this.failed = true;
                    *this.msg = Message::default();
                    return Poll::Ready(Some(Err(over_budget(this.limits).into())));
                }
                Err(Refused::Budget) => {
                    // Wait for room: registered first, then one more try, so a release in
                    // between is not missed.
                    let waiting = this
                        .waiting
                        .get_or_insert_with(|| Box::pin(this.limits.budget.freed()));
                    if waiting.as_mut().poll(cx).is_ready() {
                        *this.waiting = None;
                        continue;
                    }
                    if let Ok(permit) = this.limits.budget.acquire(data.len()) {
                        drop(permit);
                        continue;
                    }
                    *this.parked = Some(frame);
                    return stalled(
                        this.msg,
                        this.limits,
                        this.stall,
                        this.window,
                        this.failed,
                        cx,
                    );
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.parked.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Nothing to hand on now: a message that received less than its window's need (any
/// byte, or `--grpc-min-receive-rate` × the window) within the stall timeout is dropped.
fn stalled<F: Framing>(
    msg: &mut Message<F>,
    limits: &Limits,
    stall: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    window: &mut (usize, usize),
    failed: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if !msg.in_progress() || limits.stall.is_zero() {
        *stall = None;
        return Poll::Pending;
    }
    let timeout = limits.stall;
    let sleep = stall.get_or_insert_with(|| {
        *window = (0, limits.window_need().min(msg.remaining()).max(1));
        Box::pin(tokio::time::sleep(timeout))
    });
    if sleep.as_mut().poll(cx).is_pending() {
        return Poll::Pending;
    }
    *failed = true;
    let got = msg.held.as_ref().map_or(0, BytesPermit::bytes);
    *msg = Message::default();
    let message = if window.0 == 0 {
        format!("message stalled: no progress for {timeout:?} with {got} bytes of it received (--grpc-stall-timeout)")
    } else {
        format!(
            "message arriving too slowly: {} bytes in the last {timeout:?}, below --grpc-min-receive-rate {} bytes/s ({got} bytes of it received)",
            window.0, limits.min_rate
        )
    };
    Poll::Ready(Some(Err(Status::deadline_exceeded(message).into())))
}

#[cfg(test)]
mod tests;

/// A tower layer for a server's router: every request body is [`Counted`] from its first
/// byte, inference against the inference budget (with auth, the caller's share of it),
/// everything else against the small calls' pool with the small message cap.
#[derive(Clone, Debug)]
pub struct CountedLayer(pub Admission);

impl<S> tower::Layer<S> for CountedLayer {
    type Service = CountedService<S>;
    fn layer(&self, inner: S) -> CountedService<S> {
        CountedService {
            inner,
            admission: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CountedService<S> {
    inner: S,
    admission: Admission,
}

/// Whether a call's path is inference (ModelInfer or ModelStreamInfer).
pub fn is_inference(path: &str) -> bool {
    class(path).0
}

/// What a call's path says about its body: inference or small, streaming or unary.
fn class(path: &str) -> (bool, bool) {
    match path.strip_prefix("/inference.GRPCInferenceService/") {
        Some("ModelInfer") => (true, false),
        Some("ModelStreamInfer") => (true, true),
        // Reflection is the one small call that streams requests.
        _ => (false, path.ends_with("/ServerReflectionInfo")),
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for CountedService<S>
where
    S: tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let (inference, stream) = class(req.uri().path());
        let limits = match inference {
            // The tenant is known from the headers: its bytes count against its own share
            // from the first one.
            true => self
                .admission
                .inference_for(req.extensions().get::<crate::auth::Caller>()),
            false => self.admission.small.clone(),
        };
        let call = self.inner.call(
            req.map(|b| tonic::body::Body::new(Counted::<_, GrpcPrefix>::new(b, limits, stream))),
        );
        Box::pin(async move {
            let mut resp = call.await?;
            // A unary reply's bytes stay counted until its body is written or dropped.
            if let Some(held) = resp.extensions_mut().remove::<super::HeldReply>() {
                resp = crate::hold::until_body_ends(resp, held.take());
            }
            Ok(resp)
        })
    }
}
