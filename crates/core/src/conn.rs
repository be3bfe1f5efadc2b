//! Accepted connections: the accept loop with its limits, and the connection wrapper that
//! enforces the HTTP/2 handshake timeout.
//!
//! - At most `--max-connections` are open; one beyond is closed at once (counted, logged
//!   at most once a second).
//! - Accept errors (EMFILE at the fd limit, ENOBUFS) back off from 10 ms doubling to 1 s
//!   and are logged at most once a second with a count: the loop never spins, and the
//!   connections already open keep being served.
//! - A connection whose client preface and first SETTINGS frame have not arrived within
//!   `--grpc-handshake-timeout` is closed (a slow-loris holds nothing for long).
//! - With TLS, each handshake runs beside the accept loop (a slow one holds up no other)
//!   within `--grpc-handshake-timeout`, with the configuration current at that moment
//!   (rotated certificates reach new connections); a connection in its handshake counts
//!   against `--max-connections`. A client that does not speak TLS is closed.
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

/// The client preface (24 bytes) and the header of its first SETTINGS frame (9).
const HANDSHAKE_BYTES: usize = 24 + 9;

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// 0 = never.
    pub idle_timeout: Duration,
}

/// Calls open on one connection, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
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

/// One open connection counted against `--max-connections` until dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
    Box::pin(async move {
        let peer = stream.peer_addr().ok();
        match tokio::time::timeout(within, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(Conn::new(Io::Tls(Box::new(tls)), slot, limits)),
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
                Ok((stream, _)) => {
                    s.backoff = BACKOFF_FIRST;
                    if s.open.load(Ordering::SeqCst) >= s.limits.max_connections {
                        drop(stream);
                        if let Some(n) = s.refused.tick() {
                            tracing::warn!(
                                closed = n,
                                max = s.limits.max_connections,
                                "connections over --max-connections closed at once"
                            );
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let slot = Slot::take(&s.open);
                    match &s.tls {
                        Some(tls) => s.handshakes.push(handshake(tls, stream, slot, s.limits)),
                        None => {
                            let conn = Conn::new(Io::Plain(stream), slot, s.limits);
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

pin_project_lite::pin_project! {
    /// One accepted connection, counted while open.
    pub struct Conn {
        #[pin]
        stream: Io,
        // Bytes of the HTTP/2 handshake still to come, and when they must have come by.
        handshake: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
        slot: Slot,
        activity: Arc<Activity>,
        idle: Duration,
        idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl Conn {
    fn new(stream: Io, slot: Slot, limits: Limits) -> Self {
        let handshake = (!limits.handshake_timeout.is_zero()).then(|| {
            (
                HANDSHAKE_BYTES,
                Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            )
        });
        Self {
            stream,
            handshake,
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
        if let Some((left, deadline)) = this.handshake {
            match &polled {
                Poll::Ready(Ok(())) => {
                    let got = buf.filled().len() - before;
                    *left = left.saturating_sub(got);
                    if *left == 0 || got == 0 {
                        *this.handshake = None;
                    }
                }
                Poll::Ready(Err(_)) => *this.handshake = None,
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        *this.handshake = None;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "HTTP/2 handshake not completed within --grpc-handshake-timeout",
                        )));
                    }
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
