//! Panics: one log line each (no backtrace per request), counted in
//! `infermesh_panics_total`, and contained to the request that hit one: a handler's panic
//! answers that request INTERNAL while its connection's other streams go on.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::atomic::{AtomicU64, Ordering},
};

use futures::FutureExt;

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Panics seen by this process since it started.
pub fn count() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Replaces the default hook (several lines and a backtrace note on stderr) with one
/// structured log line and a count. Called once by each server's `main`.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = crate::text::prefix(message, 512);
        tracing::error!(location = %at, "panic: {message}");
    }));
}

/// Runs `fut`, turning a panic inside it into INTERNAL for this request only.
pub async fn contain<T>(
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(internal()))
}

/// A tower layer for a server's router: a request whose handler panics is answered
/// INTERNAL; the connection and its other streams carry on.
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer;

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for CatchPanic<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let called = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req)));
        Box::pin(async move {
            let fut = match called {
                Ok(fut) => fut,
                Err(_) => return Ok(internal().into_http()),
            };
            AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Ok(internal().into_http()))
        })
    }
}

fn internal() -> tonic::Status {
    crate::reason::status(
        tonic::Code::Internal,
        "the server hit an internal error (a panic) on this request; it was logged",
        crate::Reason::Engine,
    )
}
