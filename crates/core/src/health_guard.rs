//! `grpc.health.v1` with auth on: the overall entry `""` and `liveness` stay open to
//! everyone (probes send no credentials), while the health of a single model answers only
//! callers with the `read` scope, so a stranger cannot learn which models exist.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tonic_health::pb::{health_server::Health, HealthCheckRequest, HealthCheckResponse};

use crate::auth::{Auth, Caller, Scope};

/// Wraps a health service; with `auth` None it passes everything through.
pub struct Guarded<H> {
    pub inner: H,
    pub auth: Option<Arc<Auth>>,
}

impl<H> Guarded<H> {
    fn allow(&self, req: &Request<HealthCheckRequest>) -> Result<(), Status> {
        if self.auth.is_none() || matches!(req.get_ref().service.as_str(), "" | "liveness") {
            return Ok(());
        }
        match req.extensions().get::<Caller>() {
            Some(c) if c.has(Scope::Read) => Ok(()),
            _ => Err(Status::permission_denied(
                "the health of a single model needs a credential with the 'read' scope (\"\" and \"liveness\" need none)",
            )),
        }
    }
}

#[tonic::async_trait]
impl<H: Health> Health for Guarded<H> {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.allow(&req)?;
        self.inner.check(req).await
    }

    type WatchStream = H::WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.allow(&req)?;
        self.inner.watch(req).await
    }
}
