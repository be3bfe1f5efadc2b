//! Who is calling and what they may do: tenants from `--auth-config` (API keys kept as
//! SHA-256 hashes, compared in constant time), scopes per RPC and per model, and quotas
//! per tenant. A tower layer authenticates every call but health and checks the RPC's
//! scope; it puts the [`Caller`] in the request's extensions, where handlers check models
//! and quotas (per stream message too).

pub mod file;
mod jwt;
mod layer;
pub mod limits;

use std::{path::PathBuf, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tonic::Status;

pub use file::{hash_key, Scope};
pub use layer::AuthLayer;

use crate::watch::Reloadable;

/// The auth flags (both binaries).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AuthArgs {
    /// Tenants: their API keys (SHA-256 hashes), scopes, models and quotas, as YAML (see
    /// docs/security.md). Callers send `authorization: Bearer <token>`. Reloaded when the
    /// file changes; a bad file keeps the last good one. Without it, anyone who can reach
    /// the port may do everything.
    #[arg(long, env = "INFERMESH_AUTH_CONFIG")]
    pub auth_config: Option<PathBuf>,

    /// Also take JWTs (RS256, ES256) signed by these keys (a JWKS file, reloaded when it
    /// changes) as credentials; a token's `sub` names its tenant (`subjects` in the auth
    /// file).
    #[arg(long, env = "INFERMESH_AUTH_JWKS", requires_all = ["auth_config", "auth_jwt_audience", "auth_jwt_issuer"])]
    pub auth_jwks: Option<PathBuf>,

    /// The `aud` a JWT must carry.
    #[arg(long, env = "INFERMESH_AUTH_JWT_AUDIENCE", requires = "auth_jwks")]
    pub auth_jwt_audience: Option<String>,

    /// The `iss` a JWT must carry.
    #[arg(long, env = "INFERMESH_AUTH_JWT_ISSUER", requires = "auth_jwks")]
    pub auth_jwt_issuer: Option<String>,

    /// Clock skew allowed on a JWT's `exp` and `nbf`. A stream opened with a token is
    /// refused (UNAUTHENTICATED, the stream ends) at its first message after `exp` plus
    /// this.
    #[arg(long, env = "INFERMESH_AUTH_JWT_LEEWAY", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub auth_jwt_leeway: std::time::Duration,

    /// With --auth-config, show worker addresses and file paths in error messages and
    /// RepositoryIndex reasons to every caller, not only to callers with `admin`
    /// (`infermesh up` sets it).
    #[arg(long, env = "INFERMESH_VERBOSE_ERRORS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub verbose_errors: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantCode {
    pub tenant: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReason {
    pub tenant: String,
    pub reason: String,
}

/// `infermesh_tenant_requests_total` and `infermesh_auth_denied_total`; tenant labels
/// are configured tenants only (anything else is "(unknown)").
#[derive(Clone, Debug, Default)]
pub struct AuthMetrics {
    pub requests: Family<TenantCode, Counter>,
    pub denied: Family<TenantReason, Counter>,
}

use crate::metrics::UNKNOWN;

/// One tenant as loaded, with its quota state.
#[derive(Debug)]
pub struct TenantState {
    pub spec: file::TenantSpec,
    key_hashes: Vec<[u8; 32]>,
    quota: Arc<limits::Quota>,
    /// Its share of the request byte budget, made at its first call (a child of the
    /// process budget); kept, with the bytes it holds, across reloads.
    share: std::sync::OnceLock<crate::admission::ByteBudget>,
}

/// What a tenant's share is called in messages.
const SHARE: &str = "this tenant's share of the request budget (limits.max_inflight_share)";

#[derive(Debug, Default)]
pub struct Tenants(Vec<Arc<TenantState>>);

impl Tenants {
    /// From the file at `path`; tenants whose name and limits did not change keep their
    /// quota state across a reload.
    fn read(path: &std::path::Path, before: Option<&Tenants>) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let parsed = file::parse(&text)?;
        Ok(Self(
            parsed
                .into_iter()
                .map(|t| {
                    let same_name =
                        before.and_then(|b| b.0.iter().find(|o| o.spec.name == t.spec.name));
                    let kept = same_name.filter(|o| o.spec.limits.same_quota(&t.spec.limits));
                    // Bytes held across a reload still count against the tenant.
                    let share = std::sync::OnceLock::new();
                    if let Some(held) = same_name.and_then(|o| o.share.get()) {
                        held.set_fraction(t.spec.limits.share());
                        let _ = share.set(held.clone());
                    }
                    Arc::new(TenantState {
                        quota: kept.map_or_else(
                            || Arc::new(limits::Quota::new(&t.spec.limits)),
                            |o| o.quota.clone(),
                        ),
                        share,
                        spec: t.spec,
                        key_hashes: t.key_hashes,
                    })
                })
                .collect(),
        ))
    }
}

#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    current: Arc<Reloadable<Tenants>>,
    jwt: Option<jwt::Jwt>,
    verbose: bool,
    pub metrics: AuthMetrics,
}

impl Auth {
    /// Loads the file the flags name (None: no auth) and registers the metrics.
    pub fn from_args(
        args: &AuthArgs,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Option<Arc<Self>>, String> {
        let Some(path) = &args.auth_config else {
            return Ok(None);
        };
        let tenants = Tenants::read(path, None)
            .map_err(|e| format!("--auth-config {}: {e}", path.display()))?;
        let jwt = match (
            &args.auth_jwks,
            &args.auth_jwt_audience,
            &args.auth_jwt_issuer,
        ) {
            (Some(jwks), Some(aud), Some(iss)) => Some(jwt::Jwt::load(
                jwks.clone(),
                aud.clone(),
                iss.clone(),
                args.auth_jwt_leeway.as_secs(),
            )?),
            _ => None,
        };
        let metrics = AuthMetrics::default();
        registry.register(
            "infermesh_tenant_requests",
            "Inference requests (each stream message counts) by tenant and gRPC status",
            metrics.requests.clone(),
        );
        registry.register(
            "infermesh_auth_denied",
            "Calls refused by auth or quota, by tenant and reason",
            metrics.denied.clone(),
        );
        Ok(Some(Arc::new(Self {
            path: path.clone(),
            current: Reloadable::new(tenants),
            jwt,
            verbose: args.verbose_errors,
            metrics,
        })))
    }

    /// The watched entries that reload the auth file and the JWKS when they change.
    pub fn watched(&self) -> Vec<crate::watch::Watched> {
        let (path, current) = (self.path.clone(), self.current.clone());
        let tenants = self
            .current
            .watched("auth-config", vec![self.path.clone()], move || {
                Tenants::read(&path, Some(&current.get()))
            });
        let mut all: Vec<_> = self.jwt.iter().map(jwt::Jwt::watched).collect();
        all.push(tenants);
        all
    }

    fn deny(&self, tenant: &str, reason: &str) {
        self.metrics
            .denied
            .get_or_create(&TenantReason {
                tenant: tenant.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Reloads of the auth file and the JWKS so far: a stream looks its tenant up again
    /// only when this moved.
    fn generation(&self) -> u64 {
        self.current.generation() + self.jwt.as_ref().map_or(0, jwt::Jwt::generation)
    }

    /// The caller the request's credentials name, or UNAUTHENTICATED.
    pub fn authenticate(self: &Arc<Self>, headers: &http::HeaderMap) -> Result<Caller, Status> {
        let token = match bearer(headers) {
            Ok(t) => t,
            Err(why) => {
                self.deny(UNKNOWN, "no-credential");
                return Err(Status::unauthenticated(why));
            }
        };
        let credential = match (&self.jwt, token.matches('.').count() == 2) {
            (Some(_), true) => Credential::Jwt {
                token: token.into(),
                exp: 0,
            },
            _ => {
                let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
                Credential::Key(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
            }
        };
        let generation = self.generation();
        let (tenant, credential) = self.resolve(credential)?;
        Ok(Caller {
            tenant,
            auth: self.clone(),
            credential,
            generation,
        })
    }

    /// The tenant a credential names now (a JWT verified, its expiry learned).
    fn resolve(&self, credential: Credential) -> Result<(Arc<TenantState>, Credential), Status> {
        let tenants = self.current.get();
        match credential {
            Credential::Jwt { token, .. } => {
                let jwt = self
                    .jwt
                    .as_ref()
                    .expect("a JWT credential needs --auth-jwks");
                let (sub, exp) = jwt.subject(&token).map_err(|why| {
                    self.deny(UNKNOWN, "bad-credential");
                    Status::unauthenticated(format!("authorization: {why}"))
                })?;
                let tenant = tenants
                    .0
                    .iter()
                    .find(|t| t.spec.subjects.contains(&sub))
                    .cloned();
                match tenant {
                    Some(tenant) => Ok((tenant, Credential::Jwt { token, exp })),
                    None => {
                        self.deny(UNKNOWN, "unknown-subject");
                        Err(Status::permission_denied(
                            "authorization: the token is valid, but its subject is no tenant's",
                        ))
                    }
                }
            }
            Credential::Key(digest) => {
                // Every key is compared, in constant time, whichever matches.
                let mut found = None;
                for t in &tenants.0 {
                    for k in &t.key_hashes {
                        if constant_time_eq(k, &digest) {
                            found = Some(t.clone());
                        }
                    }
                }
                match found {
                    Some(tenant) => Ok((tenant, credential)),
                    None => {
                        self.deny(UNKNOWN, "bad-credential");
                        Err(Status::unauthenticated(
                            "authorization: the bearer token matches no key",
                        ))
                    }
                }
            }
        }
    }
}

/// What a caller presented: the SHA-256 of an API key, or a JWT (kept to verify again
/// when the JWKS changes) with its `exp`.
#[derive(Clone, Debug)]
enum Credential {
    Key([u8; 32]),
    Jwt { token: Arc<str>, exp: u64 },
}

/// Absolute paths (a word starting with '/' that has another '/') become "<path>".
fn scrub_paths(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('/') {
        let starts_word = i == 0 || rest[..i].ends_with([' ', '\'', '"', '(', '=', ':']);
        let end = rest[i..]
            .find([' ', '\'', '"', ')', ',', ';', ':'])
            .map_or(rest.len(), |e| i + e);
        let word = &rest[i..end];
        out.push_str(&rest[..i]);
        if starts_word && word[1..].contains('/') {
            out.push_str("<path>");
        } else {
            out.push_str(word);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &http::HeaderMap) -> Result<&str, &'static str> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or("authorization: expected 'Bearer <token>', got no authorization header")?;
    let value = value
        .to_str()
        .map_err(|_| "authorization: expected 'Bearer <token>', got bytes that are not text")?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err("authorization: expected 'Bearer <token>'"),
    }
}

/// An authenticated caller, in the request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    tenant: Arc<TenantState>,
    auth: Arc<Auth>,
    credential: Credential,
    /// The auth generation `tenant` was looked up at.
    generation: u64,
}

impl Caller {
    /// Checks the credential again before another message of a long-lived stream: an
    /// expired JWT, or a key or subject that a reload removed, is UNAUTHENTICATED (the
    /// stream ends); a reload that changed the tenant's models or limits applies from
    /// here on. Looks the tenant up again only when the auth file or JWKS was reloaded.
    pub fn refresh(&mut self) -> Result<(), Status> {
        if let Credential::Jwt { exp, .. } = &self.credential {
            let leeway = self.auth.jwt.as_ref().map_or(0, jwt::Jwt::leeway);
            if jwt::now_s() > exp.saturating_add(leeway) {
                self.auth.deny(self.tenant(), "expired");
                return Err(Status::unauthenticated(
                    "authorization: the token this stream was opened with has expired",
                ));
            }
        }
        let generation = self.auth.generation();
        if generation == self.generation {
            return Ok(());
        }
        let (tenant, credential) =
            self.auth
                .resolve(self.credential.clone())
                .map_err(|s| match s.code() {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        Status::unauthenticated(format!(
                            "{}; it was revoked while this stream was open",
                            s.message()
                        ))
                    }
                    _ => s,
                })?;
        self.tenant = tenant;
        self.credential = credential;
        self.generation = generation;
        Ok(())
    }

    /// The tenant's share of `process` (the request byte budget), made at first use.
    pub fn share(&self, process: &crate::admission::ByteBudget) -> crate::admission::ByteBudget {
        self.tenant
            .share
            .get_or_init(|| process.share(self.tenant.spec.limits.share(), SHARE))
            .clone()
    }

    pub fn tenant(&self) -> &str {
        &self.tenant.spec.name
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.tenant.spec.scopes.contains(&scope)
    }

    /// PERMISSION_DENIED naming the scope, never the tenant's other rights.
    pub fn require(&self, scope: Scope) -> Result<(), Status> {
        if self.has(scope) {
            return Ok(());
        }
        self.auth.deny(self.tenant(), "scope");
        Err(Status::permission_denied(format!(
            "this credential lacks the '{}' scope",
            scope.as_str()
        )))
    }

    /// Whether this caller may see worker addresses and file paths in messages.
    pub fn sees_internals(&self) -> bool {
        self.auth.verbose || self.has(Scope::Admin)
    }

    /// `message` as this caller may see it: without internals, each of `addresses`
    /// becomes "a worker" and absolute paths become "<path>".
    pub fn scrub(&self, message: &str, addresses: &[&str]) -> String {
        if self.sees_internals() {
            return message.to_string();
        }
        let mut out = message.to_string();
        for a in addresses {
            out = out.replace(a, "a worker");
        }
        scrub_paths(&out)
    }

    /// A status as this caller may see it (see [`Caller::scrub`]); details go on as they
    /// are (reasons carry no addresses).
    pub fn scrub_status(&self, status: Status, addresses: &[&str]) -> Status {
        if self.sees_internals() {
            return status;
        }
        let message = self.scrub(status.message(), addresses);
        Status::with_details(status.code(), message, status.details().to_vec().into())
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.tenant.spec.allows_model(model)
    }

    /// PERMISSION_DENIED naming the model when it is not open to this caller.
    pub fn model(&self, model: &str) -> Result<(), Status> {
        if self.allows_model(model) {
            return Ok(());
        }
        self.auth.deny(self.tenant(), "model");
        Err(Status::permission_denied(format!(
            "model '{}' is not open to this credential",
            crate::text::clip(model)
        )))
    }

    /// One inference request against the tenant's quotas: RESOURCE_EXHAUSTED at once
    /// when over; the permit is held while it runs.
    pub fn admit(&self) -> Result<limits::Permit, Status> {
        self.tenant.quota.admit().map_err(|over| {
            let (reason, what) = match over {
                limits::Over::Rate => ("rate", "requests_per_second"),
                limits::Over::Concurrency => ("concurrency", "max_concurrent"),
            };
            self.auth.deny(self.tenant(), reason);
            crate::reason::status(
                tonic::Code::ResourceExhausted,
                format!("over this tenant's {what}"),
                crate::Reason::OverQuota,
            )
        })
    }

    /// One call that is not inference, against the tenant's small-calls bucket.
    pub fn admit_small(&self) -> Result<(), Status> {
        if self.tenant.quota.admit_small() {
            return Ok(());
        }
        self.auth.deny(self.tenant(), "rate");
        Err(crate::reason::status(
            tonic::Code::ResourceExhausted,
            "over this tenant's small_calls_per_second (metadata, index, statistics and other calls that are not inference)",
            crate::Reason::OverQuota,
        ))
    }

    /// Counts one finished inference request.
    pub fn record(&self, code: tonic::Code) {
        self.auth
            .metrics
            .requests
            .get_or_create(&TenantCode {
                tenant: self.tenant().into(),
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// The scope an RPC needs beyond a valid credential (None: any valid credential).
pub fn rpc_scope(path: &str) -> Option<Scope> {
    let method = path.strip_prefix("/inference.GRPCInferenceService/");
    match method {
        Some("ServerLive" | "ServerReady" | "ServerMetadata") => None,
        Some(
            "ModelInfer" | "ModelStreamInfer" | "ModelMetadata" | "ModelConfig" | "ModelReady",
        ) => Some(Scope::Infer),
        Some("ModelStatistics" | "RepositoryIndex") => Some(Scope::Read),
        // Model control, and everything else that changes the server (shared memory,
        // trace and log settings).
        Some(_) => Some(Scope::Admin),
        None if path.starts_with("/grpc.reflection.") => Some(Scope::Read),
        // The admin API's reads, listed one by one: any other method of it is admin.
        None if path == "/infermesh.admin.v1.Routes/Get" => Some(Scope::Read),
        None if path == "/infermesh.placement.v1.Placement/Watch" => Some(Scope::Read),
        None => Some(Scope::Admin),
    }
}

/// The caller the auth layer put in a request (None without `--auth-config`).
pub fn caller<T>(req: &tonic::Request<T>) -> Option<Caller> {
    req.extensions().get::<Caller>().cloned()
}

/// PERMISSION_DENIED when `model` is not open to the request's caller.
pub fn check_model<T>(req: &tonic::Request<T>, model: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) => c.model(model),
        None => Ok(()),
    }
}

/// Runs one inference request (a unary call or one stream message) as `caller`: the
/// model must be open to it and its quotas must admit it; its code is counted.
pub async fn infer<T>(
    caller: Option<&Caller>,
    model: &str,
    run: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let Some(c) = caller else {
        return run.await;
    };
    let result = match c.model(model).and_then(|()| c.admit()) {
        Err(s) => Err(s),
        Ok(_permit) => run.await,
    };
    c.record(
        result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
    );
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_are_scrubbed_and_other_slashes_kept() {
        assert_eq!(
            super::scrub_paths("cannot read /models/mlp/1/model.onnx: 1/2 done (at '/etc/x/y')"),
            "cannot read <path>: 1/2 done (at '<path>')"
        );
        assert_eq!(super::scrub_paths("no slash"), "no slash");
    }
}
