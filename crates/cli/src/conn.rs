//! How the CLI reaches a server: TLS (`--ca`, `--cert`, `--key`, `https://` URLs) and a
//! bearer token (`--token`).

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
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
        answered_http: Default::default(),
    })
}

/// A channel that adds the bearer token to every call, and notes whether the server ever
/// answered with something other than gRPC (an HTTP/REST port).
#[derive(Clone, Debug)]
pub struct Conn {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
    answered_http: Arc<AtomicBool>,
}

impl Conn {
    /// Whether an answer came without gRPC's content type: the URL names an HTTP/REST
    /// port (KServe v2), where a gRPC call finds no such endpoint.
    pub fn answered_http(&self) -> bool {
        self.answered_http.load(Ordering::Relaxed)
    }
}

impl tower::Service<http::Request<Body>> for Conn {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(v) = &self.authorization {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, v.clone());
        }
        let call = self.channel.call(req);
        let answered_http = self.answered_http.clone();
        Box::pin(async move {
            let resp = call.await?;
            let grpc = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if !grpc {
                answered_http.store(true, Ordering::Relaxed);
            }
            Ok(resp)
        })
    }
}

/// The fix for a failed call whose error a newcomer cannot read, if there is one:
/// plaintext to a TLS port (found out by asking the port: an HTTP/2 server answers the
/// client preface with SETTINGS, a TLS one never does), TLS to a plaintext port, and a
/// certificate from a CA the client was not given (rustls says these two only in words,
/// matched here in one place, pinned by a test).
pub async fn hint(url: &str, error: &str) -> Option<&'static str> {
    if url.starts_with("https://") {
        return tls_hint(error);
    }
    if error.contains("onnection refused") {
        return None;
    }
    let addr = url.split_once("://").map_or(url, |(_, rest)| rest);
    match speaks_plaintext_h2(addr).await {
        Some(false) => Some(
            "the server does not speak plaintext HTTP/2 there (TLS?): use an https:// URL, with --ca if its certificate comes from a private CA",
        ),
        _ => None,
    }
}

pub fn tls_hint(error: &str) -> Option<&'static str> {
    if error.contains("InvalidContentType") {
        Some("the server speaks plaintext: drop https:// and --ca/--cert/--key")
    } else if error.contains("UnknownIssuer") {
        Some("the server's certificate is not signed by a CA this client trusts: pass --ca with the CA that signed it")
    } else {
        None
    }
}

/// Whether `addr` answers the HTTP/2 client preface with a SETTINGS frame; None when it
/// cannot be reached or says nothing in time.
async fn speaks_plaintext_h2(addr: &str) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let within = std::time::Duration::from_secs(2);
    let mut s = tokio::time::timeout(within, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .ok()?;
    let mut head = [0u8; 9];
    match tokio::time::timeout(within, s.read_exact(&mut head)).await {
        Ok(Ok(_)) => Some(head[3] == 0x04),
        // Closed before a frame header: whatever it speaks, it is not HTTP/2 in plaintext.
        Ok(Err(_)) => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tls_hints_match_what_rustls_says() {
        // As the CLI printed them against a plaintext worker and a TLS one.
        for (said, hint) in [
            ("cannot connect to https://127.0.0.1:1: transport error: received corrupt message of type InvalidContentType", "plaintext"),
            ("cannot connect to https://127.0.0.1:1: transport error: invalid peer certificate: UnknownIssuer", "--ca"),
        ] {
            assert!(super::tls_hint(said).is_some_and(|h| h.contains(hint)), "{said}");
        }
        assert_eq!(super::tls_hint("model 'x' is not ready"), None);
    }
}
