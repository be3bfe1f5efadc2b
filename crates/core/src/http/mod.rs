//! The KServe v2 HTTP/REST door (`--http-port`), beside gRPC on every server: HTTP/1.1
//! and HTTP/2 (cleartext or over the gRPC port's TLS) on the same connection layer
//! (`conn`: connection cap, handshake and idle timeouts, mTLS). Each request becomes the
//! gRPC call it stands for and goes through the server's own gRPC stack in process
//! (`call`), so auth, byte admission, validation, deadlines, metrics and reasons are the
//! gRPC path's. The endpoints are in `routes`; JSON tensors in `infer` and
//! `tensor_json`; errors as `{"error": ...}` with an HTTP status from `status`.

mod body;
pub mod call;
pub mod infer;
mod meta;
mod prescan;
mod routes;
pub mod status;
pub mod tensor_json;

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tonic::transport::server::Connected;

pub use call::Stack;

/// What the HTTP door needs from its server.
pub struct Door {
    /// The server's gRPC stack (its layers and services).
    pub stack: Stack,
    /// The gRPC port's byte rules: a body counts against the inference budget (with auth,
    /// the caller's share of it) or the small calls' pool as it arrives, capped at the
    /// largest message, and must keep arriving (stall timeout, minimum rate).
    pub admission: crate::admission::body::Admission,
    /// Tenants (`--auth-config`): a request with a body is authenticated before its body
    /// is read, so its bytes count against its tenant's share from the first one.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

pub type Response = http::Response<Full<Bytes>>;

impl Door {
    async fn handle(
        self: Arc<Self>,
        req: http::Request<hyper::body::Incoming>,
    ) -> Result<Response, Infallible> {
        Ok(routes::handle(&self, req).await)
    }

    /// Authenticates a request that carries a body before reading it (the Caller goes
    /// into its extensions and on to the gRPC stack, which takes it as found); refused
    /// as the stack would refuse it.
    fn authenticate(&self, parts: &mut http::request::Parts) -> Result<(), tonic::Status> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        if parts.method == http::Method::GET || parts.method == http::Method::HEAD {
            return Ok(());
        }
        match auth.authenticate(&parts.headers) {
            Ok(caller) => {
                parts.extensions.insert(caller);
                Ok(())
            }
            Err(status) => {
                if let Some(conn) = parts.extensions.get::<crate::conn::ConnInfo>() {
                    conn.activity.refused_credential();
                }
                Err(status)
            }
        }
    }
}

/// Serves the door on `listener` until `stop` resolves, then lets open requests finish
/// for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    limits: crate::conn::Limits,
    tls: Option<crate::tls::ServerTls>,
    door: Arc<Door>,
    stop: impl Future<Output = ()>,
    drain: Duration,
) {
    let incoming = crate::conn::incoming(listener, limits, tls);
    tokio::pin!(incoming, stop);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A slow-loris sending request heads byte by byte is cut off like a slow gRPC handshake.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(match limits.handshake_timeout {
            t if t.is_zero() => None,
            t => Some(t),
        });
    loop {
        let conn = tokio::select! {
            conn = incoming.next() => conn,
            () = &mut stop => break,
        };
        let Some(Ok(conn)) = conn else {
            continue;
        };
        let info = conn.connect_info();
        let door = door.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
            req.extensions_mut().insert(info.clone());
            door.clone().handle(req)
        });
        let served = builder
            .serve_connection(TokioIo::new(conn), service)
            .into_owned();
        let served = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP: drain timeout passed with requests still open");
    }
}
