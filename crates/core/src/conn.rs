//! Accepted connections: the accept loop with its limits, and the connection wrapper that
//! enforces the HTTP/2 handshake timeout.
//!
//! - At most `--max-connections` are open; one beyond is closed at once (counted, logged
//!   at most once a second).
//! - Accept errors (EMFILE at the fd limit, ENOBUFS) back off from 10 ms doubling to 1 s
//!   and are logged at most once a second with a count: the loop never spins, and the
//!   connections already open keep being served.
//! - A connection whose TLS handshake, client preface and whole first SETTINGS frame
//!   (header and payload, however the bytes are cut) have not arrived within
//!   `--grpc-handshake-timeout` of its accept is closed, and so is one that opens no call
//!   within that long after its handshake (a slow-loris holds nothing for long).
//! - With TLS, each handshake runs beside the accept loop (a slow one holds up no other),
//!   with the configuration current at that moment (rotated certificates reach new
//!   connections); a connection in its handshake counts against `--max-connections`. A
//!   client that does not speak TLS is closed.
//! - Where a per-peer cap is set (the health port), one peer address holds at most that
//!   many connections; one beyond is closed at once.
//! - A connection with no call open for `--grpc-idle-timeout` is closed. Calls are
//!   counted by [`CallLayer`] through the connection's [`ConnInfo`], which tonic puts in
//!   every request's extensions; keepalive pings do not count as use.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{stream::FuturesUnordered, Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The client preface (24 bytes), then the 9-byte header of its first frame (SETTINGS).
const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// 0 = never.
    pub idle_timeout: Duration,
    /// Connections one peer address may hold; 0 = no cap.
    pub max_per_peer: usize,
}

/// Credentials a connection may present that fail their check before it is closed: a
/// forged token costs more CPU to refuse than a good request costs to serve.
pub const MAX_BAD_CREDENTIALS: u32 = 32;

/// Calls open on one connection, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// Whether any call was ever opened.
    used: std::sync::atomic::AtomicBool,
    last: std::sync::Mutex<tokio::time::Instant>,
    /// Credentials refused on this connection so far.
    bad_credentials: std::sync::atomic::AtomicU32,
    /// Set to close the connection at its next read; the reader is woken.
    closing: std::sync::atomic::AtomicBool,
    reader: futures::task::AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            used: Default::default(),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
            bad_credentials: Default::default(),
            closing: Default::default(),
            reader: Default::default(),
        }
    }

    /// Counts one refused credential; past [`MAX_BAD_CREDENTIALS`] the connection is
    /// closed (after the answers already written). True when it is being closed.
    pub fn refused_credential(&self) -> bool {
        let n = self.bad_credentials.fetch_add(1, Ordering::Relaxed) + 1;
        if n < MAX_BAD_CREDENTIALS {
            return false;
        }
        if !self.closing.swap(true, Ordering::SeqCst) {
            tracing::debug!(
                refused = n,
                "closing a connection that keeps presenting bad credentials"
            );
        }
        self.reader.wake();
        true
    }

    /// When the connection becomes idle long enough to close, if it has no call open.
    fn idle_until(&self, idle: Duration) -> Option<tokio::time::Instant> {
        if self.open.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(*self.last.lock().expect("activity lock") + idle)
    }
}

/// One call open on a connection, until dropped.
pub struct OpenCall(Arc<Activity>);

impl OpenCall {
    pub fn new(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::SeqCst);
        activity.used.store(true, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        *self.0.last.lock().expect("activity lock") = tokio::time::Instant::now();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What tonic puts in every request's extensions for our connections.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    pub activity: Arc<Activity>,
}

/// Logs one kind of event at most once a second, with how many happened since.
struct Every {
    last: Option<Instant>,
    count: u64,
}

impl Every {
    const fn new() -> Self {
        Self {
            last: None,
            count: 0,
        }
    }

    /// Counts one; returns how many to report when a line is due.
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_secs(1)) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// How long a TLS handshake may take when `--grpc-handshake-timeout` is 0 (off): never
/// forever.
const TLS_HANDSHAKE_MAX: Duration = Duration::from_secs(10);

/// Connections open per peer address (only where a per-peer cap is set).
type Peers = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One open connection counted against `--max-connections` (and its peer's cap) until
/// dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    peer: Option<(Peers, std::net::IpAddr)>,
}

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self {
            open: open.clone(),
            peer: None,
        }
    }

    /// Counts the connection against its peer's cap; false when the peer is at it.
    fn for_peer(&mut self, peers: &Peers, ip: std::net::IpAddr, max: usize) -> bool {
        let mut held = peers.lock().expect("peers lock");
        let n = held.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        self.peer = Some((peers.clone(), ip));
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        if let Some((peers, ip)) = self.peer.take() {
            let mut held = peers.lock().expect("peers lock");
            if let Some(n) = held.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&ip);
                }
            }
        }
    }
}

type Handshake = Pin<Box<dyn Future<Output = Option<Conn>> + Send>>;

/// The TLS handshake of one accepted connection; None when it failed or took too long.
fn handshake(
    tls: &crate::tls::ServerTls,
    stream: TcpStream,
    slot: Slot,
    limits: Limits,
) -> Handshake {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current.get());
    let within = match limits.handshake_timeout {
        t if t.is_zero() => TLS_HANDSHAKE_MAX,
        t => t,
    };
    let accepted = tokio::time::Instant::now();
    Box::pin(async move {
        let peer = stream.peer_addr().ok();
        match tokio::time::timeout(within, acceptor.accept(stream)).await {
            // The HTTP/2 handshake must end within the same time from the accept.
            Ok(Ok(tls)) => Some(Conn::new(Io::Tls(Box::new(tls)), slot, limits, accepted)),
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(
                    ?peer,
                    "TLS handshake not completed within --grpc-handshake-timeout"
                );
                None
            }
        }
    })
}

/// The accepted connections of `listener`, as `serve_with_incoming` takes them; over TLS
/// when `tls` is given.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<crate::tls::ServerTls>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    struct State {
        listener: TcpListener,
        limits: Limits,
        tls: Option<crate::tls::ServerTls>,
        handshakes: FuturesUnordered<Handshake>,
        open: Arc<AtomicUsize>,
        peers: Peers,
        backoff: Duration,
        errors: Every,
        refused: Every,
    }
    let state = State {
        listener,
        limits,
        tls,
        handshakes: FuturesUnordered::new(),
        open: Arc::new(AtomicUsize::new(0)),
        peers: Default::default(),
        backoff: BACKOFF_FIRST,
        errors: Every::new(),
        refused: Every::new(),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let accepted = tokio::select! {
                accepted = s.listener.accept() => accepted,
                Some(done) = s.handshakes.next(), if !s.handshakes.is_empty() => {
                    if let Some(conn) = done {
                        return Some((Ok(conn), s));
                    }
                    continue;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    s.backoff = BACKOFF_FIRST;
                    if s.open.load(Ordering::SeqCst) >= s.limits.max_connections {
                        drop(stream);
                        if let Some(n) = s.refused.tick() {
                            tracing::warn!(
                                closed = n,
                                max = s.limits.max_connections,
                                "connections over the connection limit closed at once"
                            );
                        }
                        continue;
                    }
                    let mut slot = Slot::take(&s.open);
                    if s.limits.max_per_peer > 0
                        && !slot.for_peer(&s.peers, peer.ip(), s.limits.max_per_peer)
                    {
                        drop((stream, slot));
                        if let Some(n) = s.refused.tick() {
                            tracing::warn!(
                                closed = n,
                                max = s.limits.max_per_peer,
                                "connections over the per-peer limit closed at once"
                            );
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    match &s.tls {
                        Some(tls) => s.handshakes.push(handshake(tls, stream, slot, s.limits)),
                        None => {
                            let now = tokio::time::Instant::now();
                            let conn = Conn::new(Io::Plain(stream), slot, s.limits, now);
                            return Some((Ok(conn), s));
                        }
                    }
                }
                Err(e) => {
                    if let Some(n) = s.errors.tick() {
                        tracing::warn!(error = %e, errors = n, backoff = ?s.backoff, "accept failed; backing off");
                    }
                    tokio::time::sleep(s.backoff).await;
                    s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    })
}

/// A connection's bytes: TCP, or TLS over TCP.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

/// Calls `$method` on whichever stream `$io` (a `Pin<&mut Io>`) holds; both are Unpin.
macro_rules! on_io {
    ($io:expr, $s:ident => $call:expr) => {
        match $io.get_mut() {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $call
            }
            Io::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $call
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, s => s.poll_shutdown(cx))
    }
}

/// The handshake as it arrives. HTTP/2: the preface, then the first frame's header, whose
/// length says how much payload is still to come. HTTP/1.1 (the HTTP/REST port): the
/// first request's head, up to its blank line. Which one is told by the first 3 bytes.
#[derive(Debug, Default)]
struct Handshake2 {
    seen: usize,
    header: [u8; FRAME_HEADER],
    /// The first bytes (to tell HTTP/2's "PRI" from an HTTP/1.1 method), then the last 4
    /// bytes seen (to find an HTTP/1.1 head's end).
    recent: [u8; 4],
    http1: bool,
}

impl Handshake2 {
    /// Takes the bytes read; true once the preface and the whole first frame are in.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.seen < 3 {
                self.recent[self.seen] = b;
                if self.seen == 2 {
                    self.http1 = &self.recent[..3] != b"PRI";
                }
            } else if self.http1 {
                self.recent = [self.recent[1], self.recent[2], self.recent[3], b];
            }
            if let Some(i) = self.seen.checked_sub(PREFACE).filter(|i| *i < FRAME_HEADER) {
                self.header[i] = b;
            }
            self.seen += 1;
            if self.done() {
                return true;
            }
        }
        self.done()
    }

    fn done(&self) -> bool {
        if self.http1 {
            return self.seen >= 4 && &self.recent == b"\r\n\r\n";
        }
        if self.seen < PREFACE + FRAME_HEADER {
            return false;
        }
        let len = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]]);
        self.seen >= PREFACE + FRAME_HEADER + len as usize
    }
}

/// Where a connection is in its life, for the handshake timer.
enum Phase {
    /// Handshake bytes still to come by the deadline.
    Handshake(Handshake2, Pin<Box<tokio::time::Sleep>>),
    /// Handshake done: a first call must open by the deadline.
    FirstCall(Pin<Box<tokio::time::Sleep>>),
    Open,
}

pin_project_lite::pin_project! {
    /// One accepted connection, counted while open.
    pub struct Conn {
        #[pin]
        stream: Io,
        phase: Phase,
        handshake_timeout: Duration,
        slot: Slot,
        activity: Arc<Activity>,
        idle: Duration,
        idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl Conn {
    /// `accepted`: when the TCP connection was accepted (the handshake timer runs from
    /// there, through TLS).
    fn new(stream: Io, slot: Slot, limits: Limits, accepted: tokio::time::Instant) -> Self {
        let timeout = limits.handshake_timeout;
        let phase = match timeout.is_zero() {
            true => Phase::Open,
            false => Phase::Handshake(
                Handshake2::default(),
                Box::pin(tokio::time::sleep_until(accepted + timeout)),
            ),
        };
        Self {
            stream,
            phase,
            handshake_timeout: timeout,
            slot,
            activity: Arc::new(Activity::new()),
            idle: limits.idle_timeout,
            idle_timer: None,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        this.activity.reader.register(cx.waker());
        if this.activity.closing.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "too many bad credentials on one connection",
            )));
        }
        let before = buf.filled().len();
        let polled = this.stream.poll_read(cx, buf);
        if polled.is_pending() && !this.idle.is_zero() {
            // No call open for the idle timeout: close. The timer is re-armed from the
            // end of the last call whenever it fires early.
            loop {
                let Some(until) = this.activity.idle_until(*this.idle) else {
                    *this.idle_timer = None;
                    break;
                };
                let timer = this
                    .idle_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if timer.deadline() != until {
                    timer.as_mut().reset(until);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    break;
                }
                if this.activity.idle_until(*this.idle) == Some(until) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle for --grpc-idle-timeout",
                    )));
                }
            }
        }
        match this.phase {
            Phase::Open => {}
            Phase::Handshake(progress, deadline) => match &polled {
                Poll::Ready(Ok(())) => {
                    let got = &buf.filled()[before..];
                    if progress.feed(got) {
                        *this.phase =
                            Phase::FirstCall(Box::pin(tokio::time::sleep(*this.handshake_timeout)));
                    } else if got.is_empty() {
                        *this.phase = Phase::Open; // end of stream: hyper closes it
                    }
                }
                Poll::Ready(Err(_)) => *this.phase = Phase::Open,
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        *this.phase = Phase::Open;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "HTTP/2 handshake not completed within --grpc-handshake-timeout",
                        )));
                    }
                }
            },
            Phase::FirstCall(deadline) => {
                if this.activity.used.load(Ordering::Relaxed) {
                    *this.phase = Phase::Open;
                } else if polled.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                    *this.phase = Phase::Open;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no call opened within --grpc-handshake-timeout of the handshake",
                    )));
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.stream.tcp().connect_info(),
            activity: self.activity.clone(),
        }
    }
}

/// A tower layer that counts each call as open on its connection until its response
/// body ends (so a long stream keeps its connection from being idle).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallLayer;

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;
    fn layer(&self, inner: S) -> CallService<S> {
        CallService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for CallService<S>
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
        let call = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| OpenCall::new(&c.activity));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match call {
                Some(call) => crate::hold::until_body_ends(resp, call),
                None => resp,
            })
        })
    }
}
