//! DNS discovery: resolve NAME every `refresh` and diff the address set into changes. A
//! resolver error or an empty answer keeps the last good set (logged and counted): a DNS
//! outage must not empty the pool. `--dns-server` asks one server directly (a minimal A
//! query over UDP), so tests never touch the machine's resolver configuration; without
//! it the system resolver (getaddrinfo) answers.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{net::UdpSocket, sync::mpsc};

use super::Change;

/// `NAME:PORT` to follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: u16,
}

impl std::str::FromStr for DnsTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}': expected NAME:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("'{s}': port '{port}' is not a number"))?;
        Ok(Self {
            name: name.trim_end_matches('.').to_string(),
            port,
        })
    }
}

/// Follows `target` until the receiver is dropped; `failures` counts lookups that failed
/// or came back empty.
pub fn follow_dns(
    target: DnsTarget,
    server: Option<SocketAddr>,
    refresh: Duration,
    failures: prometheus_client::metrics::counter::Counter,
) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut current: BTreeSet<String> = BTreeSet::new();
        loop {
            match resolve(&target, server).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let next: BTreeSet<String> = addrs
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, target.port).to_string())
                        .collect();
                    for gone in current.difference(&next) {
                        if tx.send(Change::Remove(gone.clone())).await.is_err() {
                            return;
                        }
                    }
                    for new in next.difference(&current) {
                        if tx.send(Change::Insert(new.clone())).await.is_err() {
                            return;
                        }
                    }
                    if next != current {
                        tracing::info!(name = %target.name, workers = ?next, "DNS answer changed");
                    }
                    current = next;
                }
                Ok(_) => {
                    failures.inc();
                    tracing::warn!(name = %target.name, "DNS answered no addresses; keeping the last good set");
                }
                Err(e) => {
                    failures.inc();
                    tracing::warn!(name = %target.name, error = %e, "DNS lookup failed; keeping the last good set");
                }
            }
            tokio::time::sleep(refresh).await;
        }
    });
    rx
}

async fn resolve(target: &DnsTarget, server: Option<SocketAddr>) -> Result<Vec<IpAddr>, String> {
    match server {
        Some(server) => query_a(&target.name, server).await,
        None => tokio::net::lookup_host((target.name.as_str(), target.port))
            .await
            .map(|it| it.map(|a| a.ip()).collect())
            .map_err(|e| e.to_string()),
    }
}

/// One A query to `server`, answered within 2 s.
async fn query_a(name: &str, server: SocketAddr) -> Result<Vec<IpAddr>, String> {
    let id: u16 = fastrand::u16(..);
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|&l| l < 64)
            .ok_or("DNS label too long")?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(&q).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .map_err(|_| format!("no answer from {server} within 2 s"))?
        .map_err(|e| e.to_string())?;
    parse_a(&buf[..n], id)
}

/// The A records of a response to query `id`.
fn parse_a(m: &[u8], id: u16) -> Result<Vec<IpAddr>, String> {
    let short = || "truncated DNS response".to_string();
    if m.len() < 12 || u16::from_be_bytes([m[0], m[1]]) != id {
        return Err("DNS response does not match the query".into());
    }
    let rcode = m[3] & 0x0f;
    if rcode == 3 {
        return Ok(Vec::new()); // NXDOMAIN: no addresses
    }
    if rcode != 0 {
        return Err(format!("DNS server answered rcode {rcode}"));
    }
    let (qd, an) = (
        u16::from_be_bytes([m[4], m[5]]),
        u16::from_be_bytes([m[6], m[7]]),
    );
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at).ok_or_else(short)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(m, at).ok_or_else(short)?;
        let rr = m.get(at..at + 10).ok_or_else(short)?;
        let (typ, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        let data = m.get(at + 10..at + 10 + len).ok_or_else(short)?;
        if typ == 1 && len == 4 {
            out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            )));
        }
        at += 10 + len;
    }
    Ok(out)
}

/// Index just past the (possibly compressed) name at `at`.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)?;
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        if len == 0 {
            return Some(at + 1);
        }
        at += 1 + len as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_records_with_compressed_names() {
        // id 0x1234, response, 1 question, 2 answers (name pointers to offset 12).
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        m.extend_from_slice(b"\x01w\x04test\x00\x00\x01\x00\x01");
        for ip in [[127, 0, 0, 2], [127, 0, 0, 3]] {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
            m.extend_from_slice(&ip);
        }
        let ips = parse_a(&m, 0x1234).unwrap();
        assert_eq!(
            ips,
            [
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "127.0.0.3".parse().unwrap()
            ]
        );
        assert!(parse_a(&m, 0x9999).is_err());
        assert!(parse_a(&m[..20], 0x1234).is_err());
    }

    #[test]
    fn targets_parse() {
        let t: DnsTarget = "workers.ns.svc.cluster.local.:8001".parse().unwrap();
        assert_eq!(
            (t.name.as_str(), t.port),
            ("workers.ns.svc.cluster.local", 8001)
        );
        assert!("nope".parse::<DnsTarget>().is_err());
    }
}
