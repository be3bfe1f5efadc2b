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

use futures::Stream;
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

/// The accepted connections of `listener`, as `serve_with_incoming` takes them.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    struct State {
        listener: TcpListener,
        limits: Limits,
        open: Arc<AtomicUsize>,
        backoff: Duration,
        errors: Every,
        refused: Every,
    }
    let state = State {
        listener,
        limits,
        open: Arc::new(AtomicUsize::new(0)),
        backoff: BACKOFF_FIRST,
        errors: Every::new(),
        refused: Every::new(),
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            match s.listener.accept().await {
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
                    let conn = Conn::new(stream, s.open.clone(), s.limits);
                    return Some((Ok(conn), s));
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

pin_project_lite::pin_project! {
    /// One accepted connection, counted while open.
    pub struct Conn {
        #[pin]
        stream: TcpStream,
        // Bytes of the handshake still to come, and when they must have come by.
        handshake: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
        open: Arc<AtomicUsize>,
        activity: Arc<Activity>,
        idle: Duration,
        idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl PinnedDrop for Conn {
        fn drop(this: Pin<&mut Self>) {
            this.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Conn {
    fn new(stream: TcpStream, open: Arc<AtomicUsize>, limits: Limits) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        let handshake = (!limits.handshake_timeout.is_zero()).then(|| {
            (
                HANDSHAKE_BYTES,
                Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            )
        });
        Self {
            stream,
            handshake,
            open,
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
            tcp: self.stream.connect_info(),
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
