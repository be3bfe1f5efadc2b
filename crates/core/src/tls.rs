//! TLS for both binaries: rustls with the ring provider (no OpenSSL). Servers take their
//! material from PEM files named by flags (Triton's names); the file watcher
//! ([`crate::watch`]) swaps new material in, and every handshake takes what is current, so
//! a certificate rotated on disk reaches new connections without a restart while open
//! ones go on.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

mod client;

pub use client::{ClientFiles, ClientTls, Connector};

use crate::watch::Reloadable;
use rustls::{
    client::danger::HandshakeSignatureValid,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

/// The TLS flags of a server's gRPC port.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Serve gRPC over TLS (Triton's flag; TLS is also on whenever --grpc-server-cert is
    /// given). Needs --grpc-server-cert and --grpc-server-key.
    #[arg(long, env = "INFERMESH_GRPC_USE_SSL", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub grpc_use_ssl: bool,

    /// The server's certificate chain (PEM), leaf first. Reloaded when the file changes.
    #[arg(long, env = "INFERMESH_GRPC_SERVER_CERT", requires = "grpc_server_key")]
    pub grpc_server_cert: Option<PathBuf>,

    /// The server's private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC). Reloaded with the
    /// certificate.
    #[arg(long, env = "INFERMESH_GRPC_SERVER_KEY", requires = "grpc_server_cert")]
    pub grpc_server_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to (with
    /// --grpc-use-ssl-mutual). Reloaded when the file changes.
    #[arg(long, env = "INFERMESH_GRPC_ROOT_CERT")]
    pub grpc_root_cert: Option<PathBuf>,

    /// Require a client certificate from --grpc-root-cert's CAs on every connection (mTLS).
    #[arg(long, env = "INFERMESH_GRPC_USE_SSL_MUTUAL", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub grpc_use_ssl_mutual: bool,

    /// Accept only client certificates with one of these names among their SANs (DNS
    /// names, IP addresses or URIs such as spiffe://..., matched exactly: a wildcard in a
    /// client certificate matches nothing), comma-separated: workers take the gateway's
    /// certificate and not every certificate the same CA issued. Needs
    /// --grpc-use-ssl-mutual.
    #[arg(
        long,
        env = "INFERMESH_GRPC_ALLOWED_CLIENT_NAMES",
        value_delimiter = ','
    )]
    pub grpc_allowed_client_names: Vec<String>,
}

/// What a TLS server reads from disk.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Some: client certificates are required and must chain to these CAs.
    pub client_ca: Option<PathBuf>,
    /// Non-empty: a client certificate must also carry one of these names.
    pub allowed_names: Vec<ClientName>,
}

/// A name a client certificate must carry exactly, as one of its SANs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientName {
    /// Lowercase.
    Dns(String),
    Ip(std::net::IpAddr),
    Uri(String),
}

impl ClientName {
    fn parse(n: &str) -> Option<Self> {
        let n = n.trim();
        if let Ok(ip) = n.parse() {
            return Some(Self::Ip(ip));
        }
        if n.contains("://") {
            return Some(Self::Uri(n.to_string()));
        }
        match ServerName::try_from(n) {
            Ok(ServerName::DnsName(_)) if !n.contains('*') => {
                Some(Self::Dns(n.to_ascii_lowercase()))
            }
            _ => None,
        }
    }

    /// Whether one SAN of a client certificate is this name, exactly.
    fn matches(&self, san: &x509_parser::extensions::GeneralName<'_>) -> bool {
        use x509_parser::extensions::GeneralName as G;
        match (self, san) {
            // A wildcard names no client.
            (Self::Dns(want), G::DNSName(got)) => {
                !got.contains('*') && got.eq_ignore_ascii_case(want)
            }
            (Self::Uri(want), G::URI(got)) => got == want,
            (Self::Ip(want), G::IPAddress(got)) => match (want, got.len()) {
                (std::net::IpAddr::V4(w), 4) => w.octets() == got[..4],
                (std::net::IpAddr::V6(w), 16) => w.octets() == got[..16],
                _ => false,
            },
            _ => false,
        }
    }
}

impl ServerFiles {
    /// The files the flags name, or None for plaintext; contradictory flags are errors
    /// that name them.
    pub fn from_args(args: &TlsArgs) -> Result<Option<Self>, String> {
        let (cert, key) = match (&args.grpc_server_cert, &args.grpc_server_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ if args.grpc_use_ssl || args.grpc_use_ssl_mutual => {
                return Err(
                    "--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key (PEM files)"
                        .into(),
                )
            }
            _ => return Ok(None),
        };
        let client_ca = match (&args.grpc_root_cert, args.grpc_use_ssl_mutual) {
            (Some(ca), true) => Some(ca.clone()),
            (None, true) => {
                return Err("--grpc-use-ssl-mutual needs --grpc-root-cert (the client CAs)".into())
            }
            (Some(_), false) => return Err(
                "--grpc-root-cert is read only with --grpc-use-ssl-mutual (client certificates)"
                    .into(),
            ),
            (None, false) => None,
        };
        if !args.grpc_allowed_client_names.is_empty() && client_ca.is_none() {
            return Err("--grpc-allowed-client-names needs --grpc-use-ssl-mutual".into());
        }
        let allowed_names = args
            .grpc_allowed_client_names
            .iter()
            .map(|n| {
                ClientName::parse(n).ok_or_else(|| {
                    format!("--grpc-allowed-client-names: '{n}' is not a DNS name (without wildcards), IP address or URI")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(Self {
            cert,
            key,
            client_ca,
            allowed_names,
        }))
    }

    /// Every file the material comes from (what the watcher hashes).
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.cert.clone(), self.key.clone()];
        p.extend(self.client_ca.clone());
        p
    }

    /// Reads the files into a server configuration: TLS 1.2 and 1.3, ALPN h2 (and
    /// http/1.1, which the HTTP/REST port serves; gRPC clients offer only h2).
    pub fn load(&self) -> Result<ServerConfig, String> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(roots(ca)?);
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                if self.allowed_names.is_empty() {
                    builder.with_client_cert_verifier(verifier)
                } else {
                    builder.with_client_cert_verifier(Arc::new(AllowedNames {
                        inner: verifier,
                        names: self.allowed_names.clone(),
                    }))
                }
            }
        };
        let mut config = builder
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| format!("{} and {}: {e}", self.cert.display(), self.key.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates from a PEM file; none is an error that names the file.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The private key from a PEM file.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A CA bundle from a PEM file.
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A server's TLS: the files and the configuration loaded from them.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub files: ServerFiles,
    pub current: Arc<Reloadable<ServerConfig>>,
}

impl ServerTls {
    /// Loads the files once; an error names the file and what is wrong with it.
    pub fn load(files: ServerFiles) -> Result<Self, String> {
        let config = files.load()?;
        Ok(Self {
            files,
            current: Reloadable::new(config),
        })
    }

    /// The watched entry that reloads this material when its files change.
    pub fn watched(&self) -> crate::watch::Watched {
        let files = self.files.clone();
        self.current
            .watched("grpc-server-cert", self.files.paths(), move || files.load())
    }
}

/// Client certificates must chain to the CA and carry one of the allowed names exactly.
#[derive(Debug)]
struct AllowedNames {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ClientName>,
}

impl ClientCertVerifier for AllowedNames {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding);
        let (_, cert) =
            x509_parser::parse_x509_certificate(end_entity.as_ref()).map_err(|_| bad())?;
        let sans = cert.subject_alternative_name().map_err(|_| bad())?;
        let names = sans.iter().flat_map(|s| s.value.general_names.iter());
        if names
            .into_iter()
            .any(|san| self.names.iter().any(|n| n.matches(san)))
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut TlsArgs)) -> Result<Option<ServerFiles>, String> {
        let mut a = TlsArgs::default();
        f(&mut a);
        ServerFiles::from_args(&a)
    }

    #[test]
    fn contradictory_flags_are_errors_that_name_them() {
        assert!(args(|_| {}).unwrap().is_none(), "no flags: plaintext");
        let e = args(|a| a.grpc_use_ssl = true).unwrap_err();
        assert!(e.contains("--grpc-server-cert"), "{e}");
        let with_files = |a: &mut TlsArgs| {
            a.grpc_server_cert = Some("c.pem".into());
            a.grpc_server_key = Some("k.pem".into());
        };
        let e = args(|a| {
            with_files(a);
            a.grpc_use_ssl_mutual = true;
        })
        .unwrap_err();
        assert!(e.contains("--grpc-root-cert"), "{e}");
        let e = args(|a| {
            with_files(a);
            a.grpc_root_cert = Some("ca.pem".into());
        })
        .unwrap_err();
        assert!(e.contains("--grpc-use-ssl-mutual"), "{e}");
        let e = args(|a| {
            with_files(a);
            a.grpc_allowed_client_names = vec!["gw".into()];
        })
        .unwrap_err();
        assert!(e.contains("--grpc-allowed-client-names"), "{e}");
        let e = args(|a| {
            with_files(a);
            a.grpc_use_ssl_mutual = true;
            a.grpc_root_cert = Some("ca.pem".into());
            a.grpc_allowed_client_names = vec!["not a name!".into()];
        })
        .unwrap_err();
        assert!(e.contains("'not a name!'"), "{e}");
        let e = args(|a| {
            with_files(a);
            a.grpc_use_ssl_mutual = true;
            a.grpc_root_cert = Some("ca.pem".into());
            a.grpc_allowed_client_names = vec!["*.infermesh.svc".into()];
        })
        .unwrap_err();
        assert!(e.contains("without wildcards"), "{e}");
        let files = args(with_files).unwrap().unwrap();
        assert!(files.client_ca.is_none() && files.allowed_names.is_empty());
    }

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = std::env::temp_dir().join(format!("infermesh-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = certs(&empty).unwrap_err();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = key(&dir.join("missing.key")).unwrap_err();
        assert!(e.contains("missing.key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
