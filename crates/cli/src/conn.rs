//! How the CLI reaches a server: TLS (`--ca`, `--cert`, `--key`, `https://` URLs) and a
//! bearer token (`--token`).

use std::{
    path::PathBuf,
    task::{Context, Poll},
};

use anyhow::Context as _;
use tonic::{body::Body, transport::Channel};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConnArgs {
    /// CA certificates (PEM) the server's certificate must chain to; turns TLS on. An
    /// https:// URL without it trusts the system's CAs.
    #[arg(long, env = "INFERMESH_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for servers that require one (mTLS); turns TLS on.
    #[arg(long, env = "INFERMESH_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "INFERMESH_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>` on every call, for a server with
    /// --auth-config.
    #[arg(long, env = "INFERMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ConnArgs {
    /// The client TLS for `url`, or None for plaintext.
    pub fn client(&self, url: &str) -> anyhow::Result<Option<infermesh_core::tls::ClientTls>> {
        if !url.starts_with("https://") && self.ca.is_none() && self.cert.is_none() {
            return Ok(None);
        }
        let files = infermesh_core::tls::ClientFiles {
            ca: self.ca.clone(),
            identity: self.cert.clone().zip(self.key.clone()),
        };
        infermesh_core::tls::ClientTls::load(files, None)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))
    }
}

/// A connection to `url`: over TLS for https:// or when `args` names certificates, with
/// the bearer token on every call.
pub async fn connect(url: &str, args: &ConnArgs) -> anyhow::Result<Conn> {
    let client_tls = args.client(url)?;
    // TLS is ours (the connector), so tonic always sees http://.
    let dial = match url.split_once("://") {
        Some((_, rest)) => format!("http://{rest}"),
        None => format!("http://{url}"),
    };
    let endpoint = Channel::from_shared(dial).with_context(|| format!("bad url {url}"))?;
    let channel = match client_tls {
        Some(t) => endpoint.connect_with_connector(t.connector(None)).await,
        None => endpoint.connect().await,
    }
    .with_context(|| format!("cannot connect to {url}"))?;
    let authorization = args
        .token
        .as_ref()
        .map(|t| {
            let mut v = http::HeaderValue::try_from(format!("Bearer {t}"))
                .context("--token: not a valid header value")?;
            v.set_sensitive(true);
            anyhow::Ok(v)
        })
        .transpose()?;
    Ok(Conn {
        channel,
        authorization,
    })
}

/// A channel that adds the bearer token to every call.
#[derive(Clone, Debug)]
pub struct Conn {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
}

impl tower::Service<http::Request<Body>> for Conn {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(v) = &self.authorization {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, v.clone());
        }
        self.channel.call(req)
    }
}
