//! Where workers come from. A source yields insert/remove changes; the pool applies them.
//! Sources: a static list (`--workers`) and DNS (`--workers-dns`, as a Kubernetes headless
//! Service is followed). An EndpointSlice watcher would be one more module here.

mod dns;

pub use dns::{follow_dns, DnsTarget};
use tokio::sync::mpsc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Insert(String),
    Remove(String),
}

/// The static source: every address once, then nothing.
pub fn fixed(addresses: &[String]) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(addresses.len().max(1));
    for a in addresses {
        let _ = tx.try_send(Change::Insert(a.clone()));
    }
    rx
}
