//! The tower layer that authenticates each call (health excepted) and checks the RPC's
//! scope before any handler runs.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tonic::body::Body;

use super::{rpc_scope, Auth};

/// Applies `auth` when there is one; a no-op otherwise.
#[derive(Clone, Debug, Default)]
pub struct AuthLayer(pub Option<Arc<Auth>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Auth>>,
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    // No allocation per call: the inner future, or the refusal ready at once.
    type Future =
        futures::future::Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        use futures::future::Either;
        let Some(auth) = &self.auth else {
            return Either::Left(self.inner.call(req));
        };
        // The HTTP door authenticates a request before reading its body and hands the
        // caller on in the extensions (never set from the wire).
        let found = req.extensions_mut().remove::<super::Caller>();
        let path = req.uri().path();
        // Probes and load balancers send no credentials: health is never refused here. A
        // credential that comes along is taken (a single model's health needs `read`).
        if path.starts_with("/grpc.health.v1.Health/") {
            if let Some(caller) = found {
                req.extensions_mut().insert(caller);
            } else if req.headers().contains_key(http::header::AUTHORIZATION) {
                if let Ok(caller) = auth.authenticate(req.headers()) {
                    req.extensions_mut().insert(caller);
                }
            }
            return Either::Left(self.inner.call(req));
        }
        let checked = found
            .map_or_else(|| auth.authenticate(req.headers()), Ok)
            .and_then(|caller| {
                if let Some(scope) = rpc_scope(path) {
                    caller.require(scope)?;
                }
                // Inference is counted per request (and per stream message) by its handler.
                if !crate::admission::body::is_inference(path) {
                    caller.admit_small()?;
                }
                Ok(caller)
            });
        match checked {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Either::Left(self.inner.call(req))
            }
            Err(status) => {
                if status.code() == tonic::Code::Unauthenticated {
                    if let Some(conn) = req.extensions().get::<crate::conn::ConnInfo>() {
                        conn.activity.refused_credential();
                    }
                }
                Either::Right(std::future::ready(Ok(status.into_http::<Body>())))
            }
        }
    }
}
