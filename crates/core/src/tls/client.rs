//! The client side: the gateway's connections to workers and the CLI's to servers. Each
//! new connection reads the configuration current at that moment, so a rotated client
//! certificate is used from the next connection on.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, ClientConfig};
use tokio::net::TcpStream;

use super::{certs, key, provider, roots};
use crate::watch::Reloadable;

/// What a TLS client reads from disk.
#[derive(Clone, Debug, Default)]
pub struct ClientFiles {
    /// CA certificates the server's certificate must chain to; None: the system's bundle
    /// ($SSL_CERT_FILE, or Debian's or Red Hat's path).
    pub ca: Option<PathBuf>,
    /// The client's own certificate and key, for servers that require one (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientFiles {
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.ca.clone().unwrap_or_else(system_roots)];
        if let Some((c, k)) = &self.identity {
            p.extend([c.clone(), k.clone()]);
        }
        p
    }

    /// Reads the files into a client configuration: TLS 1.2 and 1.3, ALPN h2.
    pub fn load(&self) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots(&self.ca.clone().unwrap_or_else(system_roots))?);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, k)) => builder
                .with_client_auth_cert(certs(cert)?, key(k)?)
                .map_err(|e| format!("{} and {}: {e}", cert.display(), k.display()))?,
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A client's TLS: the files and the configuration loaded from them.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub files: ClientFiles,
    pub current: Arc<Reloadable<ClientConfig>>,
    /// The name the server's certificate must be valid for; None: the host of the URL
    /// dialled.
    pub server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    pub fn load(files: ClientFiles, server_name: Option<&str>) -> Result<Self, String> {
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_string())
                    .map_err(|_| format!("'{n}' is not a DNS name or IP address"))
            })
            .transpose()?;
        Ok(Self {
            current: Reloadable::new(files.load()?),
            files,
            server_name,
        })
    }

    /// The watched entry that reloads this material when its files change.
    pub fn watched(&self, name: &str) -> crate::watch::Watched {
        let files = self.files.clone();
        self.current
            .watched(name, self.files.paths(), move || files.load())
    }

    /// A connector for `tonic::transport::Endpoint::connect_with_connector`. The name
    /// checked in the server's certificate: the one given at load (a flag), else `name`
    /// (what discovery found the server under), else the host of the URL dialled.
    pub fn connector(&self, name: Option<&str>) -> Connector {
        let found = name.and_then(|n| ServerName::try_from(n.to_string()).ok());
        Connector {
            tls: self.clone(),
            name: self.server_name.clone().or(found),
        }
    }
}

/// Dials TCP and runs the TLS handshake with the configuration current now.
#[derive(Clone, Debug)]
pub struct Connector {
    tls: ClientTls,
    name: Option<ServerName<'static>>,
}

type Connected = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Connector {
    type Response = Connected;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, name) = (self.tls.clone(), self.name.clone());
        Box::pin(async move {
            let host = uri.host().ok_or("the address has no host")?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = match name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|_| format!("'{host}' is not a DNS name or IP address"))?,
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls.current.get())
                .connect(name, tcp)
                .await?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err("the server did not agree to HTTP/2 (ALPN h2)".into());
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// The system's CA bundle: $SSL_CERT_FILE, else the first of the usual paths that exists.
fn system_roots() -> PathBuf {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        return f.into();
    }
    let usual = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ];
    usual
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| usual[0].into())
}
