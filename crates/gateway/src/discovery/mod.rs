//! Where workers come from. A source yields insert/remove changes; the pool applies them.
//! Sources: a static list (`--workers`) and DNS (`--workers-dns`, as a Kubernetes headless
//! Service is followed, with a maintained resolver). An EndpointSlice watcher would be one
//! more module here.

mod dns;

pub use dns::{follow_dns, DnsTarget, Family};
use tokio::sync::mpsc;

/// A worker as discovery found it: where to connect, and what routing and TLS need to
/// know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// HOST:PORT (or a URL) to connect to.
    pub addr: String,
    /// The name its certificate is checked against: the DNS name it was found under, or
    /// the host of a listed address.
    pub server_name: Option<String>,
    /// Relative weight (an SRV record's; 1 otherwise).
    pub weight: u32,
    /// Topology zone, when the source knows it.
    pub zone: Option<String>,
}

impl From<&str> for Discovered {
    fn from(addr: &str) -> Self {
        let host = addr.split("://").last().unwrap_or(addr);
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        Self {
            addr: addr.to_string(),
            server_name: Some(host.trim_matches(['[', ']']).to_string()),
            weight: 1,
            zone: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Insert(Discovered),
    /// By address.
    Remove(String),
}

/// The static source: every address once, then nothing.
pub fn fixed(addresses: &[String]) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(addresses.len().max(1));
    for a in addresses {
        let _ = tx.try_send(Change::Insert(a.as_str().into()));
    }
    rx
}
