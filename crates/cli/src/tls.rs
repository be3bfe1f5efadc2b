//! TLS for the CLI's connections: `--ca`, `--cert`, `--key` and `https://` URLs.

use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
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
}

impl TlsArgs {
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
