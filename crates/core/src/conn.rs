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
                    let conn = Conn::new(stream, s.open.clone(), s.limits.handshake_timeout);
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
    }

    impl PinnedDrop for Conn {
        fn drop(this: Pin<&mut Self>) {
            this.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Conn {
    fn new(stream: TcpStream, open: Arc<AtomicUsize>, handshake: Duration) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        let handshake = (!handshake.is_zero())
            .then(|| (HANDSHAKE_BYTES, Box::pin(tokio::time::sleep(handshake))));
        Self {
            stream,
            handshake,
            open,
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
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
