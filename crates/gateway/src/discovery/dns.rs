//! DNS discovery: resolve NAME every `refresh` with hickory-resolver and diff the address
//! set into changes. A resolver error or an empty answer keeps the last good set (logged
//! and counted): a DNS outage must not empty the pool. Answers too large for one UDP
//! datagram are asked for with EDNS0 and, when truncated, again over TCP, so a headless
//! Service of hundreds of pods is seen whole. `--dns-family` picks A, AAAA or both (a
//! dual-stack pod is one worker with the default, ipv4). `NAME` without a port follows
//! the SRV records of `_grpc._tcp.NAME` (ports and weights from DNS). `--dns-server` asks
//! one server directly, so tests never touch the machine's resolver configuration;
//! without it the system's configuration (/etc/resolv.conf) is used.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use hickory_resolver::{
    config::{LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::RData,
    Resolver, TokioResolver,
};
use tokio::sync::mpsc;

use super::{Change, Discovered};

/// `NAME:PORT` to follow, or `NAME` for the SRV records of `_grpc._tcp.NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: Option<u16>,
}

impl std::str::FromStr for DnsTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, port) = match s.rsplit_once(':') {
            Some((name, port)) => {
                let port = port
                    .parse()
                    .map_err(|_| format!("'{s}': port '{port}' is not a number"))?;
                (name, Some(port))
            }
            None => (s, None),
        };
        let name = name.trim_end_matches('.');
        if name.is_empty() {
            return Err(format!(
                "'{s}': expected NAME:PORT or NAME (for SRV records)"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            port,
        })
    }
}

/// Which address records make workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// A records only: a dual-stack pod is one worker.
    Ipv4,
    /// AAAA records only.
    Ipv6,
    /// Both: every address is a worker.
    Any,
}

/// Follows `target` until the receiver is dropped; `failures` counts lookups that failed
/// or came back empty.
pub fn follow_dns(
    target: DnsTarget,
    server: Option<SocketAddr>,
    family: Family,
    refresh: Duration,
    failures: prometheus_client::metrics::counter::Counter,
) -> Result<mpsc::Receiver<Change>, String> {
    let resolver = resolver(server, family)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut current: BTreeMap<String, Discovered> = BTreeMap::new();
        // Until nobody follows the changes any more (the gateway stopped).
        while !tx.is_closed() {
            match resolve(&resolver, &target).await {
                Ok(found) if !found.is_empty() => {
                    let next: BTreeMap<String, Discovered> =
                        found.into_iter().map(|d| (d.addr.clone(), d)).collect();
                    for gone in current.keys().filter(|a| !next.contains_key(*a)) {
                        if tx.send(Change::Remove(gone.clone())).await.is_err() {
                            return;
                        }
                    }
                    for (addr, new) in &next {
                        if !current.contains_key(addr)
                            && tx.send(Change::Insert(new.clone())).await.is_err()
                        {
                            return;
                        }
                    }
                    if next.keys().ne(current.keys()) {
                        tracing::info!(name = %target.name, workers = next.len(), "DNS answer changed");
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
    Ok(rx)
}

fn resolver(server: Option<SocketAddr>, family: Family) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for c in &mut ns.connections {
                c.port = server.port();
            }
            let config = ResolverConfig::from_parts(None, Vec::new(), vec![ns]);
            Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's DNS configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.ip_strategy = match family {
        Family::Ipv4 => LookupIpStrategy::Ipv4Only,
        Family::Ipv6 => LookupIpStrategy::Ipv6Only,
        Family::Any => LookupIpStrategy::Ipv4AndIpv6,
    };
    // Large answers: advertise a larger UDP size, and retry over TCP when truncated.
    opts.edns0 = true;
    opts.try_tcp_on_error = true;
    // The refresh interval decides how fresh the set is, not the records' TTLs.
    opts.cache_size = 0;
    builder
        .build()
        .map_err(|e| format!("building the DNS resolver: {e}"))
}

/// Every worker the name stands for now.
async fn resolve(resolver: &TokioResolver, target: &DnsTarget) -> Result<Vec<Discovered>, String> {
    let fqdn = |name: &str| format!("{}.", name.trim_end_matches('.'));
    let Some(port) = target.port else {
        let srv = resolver
            .srv_lookup(fqdn(&format!("_grpc._tcp.{}", target.name)))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for record in srv.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            let host = srv.target.to_utf8();
            for ip in resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| e.to_string())?
                .iter()
            {
                out.push(found(ip, srv.port, &host, srv.weight.into()));
            }
        }
        return Ok(out);
    };
    let ips = resolver
        .lookup_ip(fqdn(&target.name))
        .await
        .map_err(|e| e.to_string())?;
    Ok(ips
        .iter()
        .map(|ip| found(ip, port, &target.name, 1))
        .collect())
}

fn found(ip: std::net::IpAddr, port: u16, name: &str, weight: u32) -> Discovered {
    Discovered {
        addr: SocketAddr::new(ip, port).to_string(),
        server_name: Some(name.trim_end_matches('.').to_string()),
        weight,
        zone: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t: DnsTarget = "workers.ns.svc.cluster.local.:8001".parse().unwrap();
        assert_eq!(
            (t.name.as_str(), t.port),
            ("workers.ns.svc.cluster.local", Some(8001))
        );
        let srv: DnsTarget = "workers.ns.svc.cluster.local".parse().unwrap();
        assert_eq!(srv.port, None, "no port: SRV records");
        assert!("w:x".parse::<DnsTarget>().is_err());
        assert!(":8001".parse::<DnsTarget>().is_err());
    }
}
