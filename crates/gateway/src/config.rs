//! The gateway's flags.

use std::time::Duration;

use infermesh_core::{config::parse_duration, ServerArgs};

/// Balance KServe v2 / Triton gRPC requests, every message of a stream included, across
/// infermesh (or Triton) workers.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "infermesh-gateway", version = infermesh_core::VERSION, args_override_self = true)]
pub struct GatewayConfig {
    /// Workers as HOST:PORT, comma-separated (static discovery).
    #[arg(
        long,
        env = "INFERMESH_WORKERS",
        value_delimiter = ',',
        required_unless_present = "workers_dns"
    )]
    pub workers: Vec<String>,

    /// Follow a DNS name as NAME:PORT, e.g. a Kubernetes headless Service
    /// (infermesh-worker.infermesh.svc.cluster.local:8001): every address record is a
    /// worker. NAME alone follows the SRV records of _grpc._tcp.NAME (ports from DNS).
    #[arg(long, env = "INFERMESH_WORKERS_DNS", conflicts_with = "workers")]
    pub workers_dns: Option<crate::discovery::DnsTarget>,

    /// How often the DNS name is resolved again.
    #[arg(long, env = "INFERMESH_DNS_REFRESH", default_value = "5s", value_parser = parse_duration)]
    pub dns_refresh: Duration,

    /// Ask this DNS server (IP:PORT; UDP, and TCP for answers too large for UDP) instead
    /// of the servers in /etc/resolv.conf.
    #[arg(long, env = "INFERMESH_DNS_SERVER")]
    pub dns_server: Option<std::net::SocketAddr>,

    /// Which address records are workers: ipv4 (A; a dual-stack pod is one worker), ipv6
    /// (AAAA), or any (both: every address is a worker).
    #[arg(long, env = "INFERMESH_DNS_FAMILY", value_enum, default_value = "ipv4")]
    pub dns_family: crate::discovery::Family,

    /// How often each worker's readiness and ready models are refreshed.
    #[arg(long, env = "INFERMESH_WORKER_REFRESH", default_value = "1s", value_parser = parse_duration)]
    pub worker_refresh: Duration,

    /// Give up connecting to a worker after this long (it stays out of the pool).
    #[arg(long, env = "INFERMESH_WORKER_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub worker_connect_timeout: Duration,

    /// HTTP/2 PING every worker connection this often, busy or idle: a blackholed or
    /// stopped worker answers nothing, and only an unanswered PING tells (inside a cluster
    /// a PING costs microseconds).
    #[arg(long, env = "INFERMESH_WORKER_KEEPALIVE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub worker_keepalive_interval: Duration,

    /// A PING unanswered this long closes the worker's connection: its calls fail at once
    /// and are retried on another worker, instead of waiting for their deadlines.
    #[arg(long, env = "INFERMESH_WORKER_KEEPALIVE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub worker_keepalive_timeout: Duration,

    /// Speak TLS to workers, verifying their certificates against these CAs (PEM).
    /// Reloaded when the file changes.
    #[arg(long, env = "INFERMESH_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<std::path::PathBuf>,

    /// The gateway's client certificate chain (PEM) for workers that require one (mTLS).
    /// Reloaded when the file changes; used from the next connection on.
    #[arg(long, env = "INFERMESH_WORKER_TLS_CERT", requires_all = ["worker_tls_key", "worker_tls_ca"])]
    pub worker_tls_cert: Option<std::path::PathBuf>,

    /// The private key of --worker-tls-cert (PEM).
    #[arg(long, env = "INFERMESH_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<std::path::PathBuf>,

    /// The name every worker's certificate must be valid for (e.g. the headless
    /// Service's DNS name when workers are dialled by IP). Default: the name a worker was
    /// found under (--workers-dns) or the host of its address.
    #[arg(
        long,
        env = "INFERMESH_WORKER_TLS_SERVER_NAME",
        requires = "worker_tls_ca"
    )]
    pub worker_tls_server_name: Option<String>,

    /// Messages of one ModelStreamInfer stream in flight at once; beyond it the stream
    /// stops reading (back-pressure through HTTP/2 flow control).
    #[arg(long, env = "INFERMESH_MAX_STREAM_INFLIGHT", default_value_t = 128)]
    pub max_stream_inflight: usize,

    /// Keep polling sockets for this many microseconds after each request instead of
    /// sleeping (0 = off). Lower latency at low load (no wake-ups to pay), for CPU while it
    /// spins; under load nothing spins. See docs/gateway.md, "Busy polling".
    #[arg(long, env = "INFERMESH_BUSY_POLL_US", default_value_t = 0)]
    pub busy_poll_us: u64,

    /// Retries allowed per request on average, on top of a floor of 10 per second (100 in
    /// reserve): with every worker failing, attempts stay under requests × (1 + ratio) +
    /// the floor.
    #[arg(long, env = "INFERMESH_RETRY_BUDGET_RATIO", default_value = "0.2", value_parser = crate::retry::parse_ratio)]
    pub retry_budget_ratio: f64,

    /// none: RepositoryModelLoad/Unload are refused; explicit: they are forwarded to every
    /// worker.
    #[arg(
        long,
        env = "INFERMESH_MODEL_CONTROL_MODE",
        value_enum,
        default_value = "none"
    )]
    pub model_control_mode: ControlMode,

    /// How long a request that broke two workers (a query of death) is refused at the
    /// gateway, identified by its fingerprint (model, version, shapes, a hash of its bytes).
    #[arg(long, env = "INFERMESH_POISON_QUARANTINE", default_value = "10m", value_parser = parse_duration)]
    pub poison_quarantine: Duration,

    /// Bound on request bytes held in memory at once, counted from the first byte that
    /// arrives until the worker answers; beyond it requests get RESOURCE_EXHAUSTED. Keep it
    /// below the container's memory limit (the manifests: 128 MiB of 256 MiB). 0 = unbounded.
    #[arg(long, env = "INFERMESH_MAX_INFLIGHT_BYTES", default_value_t = 128 << 20)]
    pub max_inflight_bytes: usize,

    /// The routing file (YAML): per model, a weighted split over versions for requests
    /// that name none, hedging, shadow traffic and a guard that rolls a version back. A file that does not parse stops the gateway at
    /// start; it is reloaded when it changes (a bad reload keeps the last good policy).
    /// See docs/traffic.md.
    #[arg(long, env = "INFERMESH_ROUTES")]
    pub routes: Option<std::path::PathBuf>,

    /// Requests (stream messages included) that may wait at this gateway for one model to
    /// be loaded on a placement-mode worker; beyond it they get RESOURCE_EXHAUSTED
    /// (placement-queue-full). See docs/placement.md.
    #[arg(long, env = "INFERMESH_PLACEMENT_QUEUE", default_value_t = 1000)]
    pub placement_queue: usize,

    /// How long one worker's model load is waited for before the next worker in the
    /// model's ranking is asked.
    #[arg(long, env = "INFERMESH_PLACEMENT_LOAD_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub placement_load_timeout: Duration,

    /// Requests in flight per copy, averaged over a model's copies, at which its copies
    /// count as saturated: saturated for --placement-copy-window, the model gets another
    /// copy on the next worker in its ranking (up to the routing file's copies.max).
    #[arg(long, env = "INFERMESH_PLACEMENT_COPY_INFLIGHT", default_value_t = 8.0, value_parser = positive)]
    pub placement_copy_inflight: f64,

    /// How long a model's copies must stay saturated before another is loaded.
    #[arg(long, env = "INFERMESH_PLACEMENT_COPY_WINDOW", default_value = "5s", value_parser = parse_duration)]
    pub placement_copy_window: Duration,

    /// A sequence (Triton's sequence_id) unused this long is forgotten by this gateway;
    /// its next request goes where rendezvous ranking puts it. Keep it at least the
    /// models' max_sequence_idle_microseconds.
    #[arg(long, env = "INFERMESH_SEQUENCE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub sequence_idle_timeout: Duration,

    /// Sequences this gateway remembers at once; a new one beyond it (none idle past
    /// --sequence-idle-timeout) gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "INFERMESH_MAX_SEQUENCES", default_value_t = 100_000)]
    pub max_sequences: usize,

    #[command(flatten)]
    pub server: ServerArgs,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number above 0, found '{s}'")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlMode {
    None,
    Explicit,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks flag and id clashes (shared flags are flattened in) only when asked.
    #[test]
    fn flags_are_consistent() {
        super::GatewayConfig::command().debug_assert();
    }
}
