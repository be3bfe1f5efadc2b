//! Flags both servers share (docs/configuration.md). Every flag also reads an `INFERMESH_` env var:
//! Kubernetes injects `<SERVICE>_PORT=tcp://...` variables that unprefixed names collide with.

use std::{net::IpAddr, time::Duration};

/// Listening, message-size and shutdown settings of one gRPC server.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Address the gRPC server binds.
    #[arg(long, env = "INFERMESH_GRPC_ADDRESS", default_value = "0.0.0.0")]
    pub grpc_address: IpAddr,

    /// gRPC port (Triton's default is 8001). 0 picks a free port and logs the bound address.
    #[arg(long, env = "INFERMESH_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,

    /// Serve Prometheus metrics at http://<metrics-address>:<metrics-port>/metrics.
    #[arg(long, env = "INFERMESH_ALLOW_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_metrics: bool,

    /// Address the metrics endpoint binds; default: --grpc-address (a server bound to
    /// 127.0.0.1 exposes nothing else on other interfaces).
    #[arg(long, env = "INFERMESH_METRICS_ADDRESS")]
    pub metrics_address: Option<IpAddr>,

    /// Metrics port (Triton's default is 8002). 0 picks a free port and logs it.
    #[arg(long, env = "INFERMESH_METRICS_PORT", default_value_t = 8002)]
    pub metrics_port: u16,

    /// Serve KServe v2 HTTP/REST (Triton's HTTP API: health, metadata, config, statistics,
    /// inference with JSON or binary tensors, repository control) on
    /// <http-address>:<http-port>, over the gRPC port's TLS when it has TLS.
    #[arg(long, env = "INFERMESH_ALLOW_HTTP", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_http: bool,

    /// Address the HTTP/REST port binds; default: --grpc-address.
    #[arg(long, env = "INFERMESH_HTTP_ADDRESS")]
    pub http_address: Option<IpAddr>,

    /// HTTP/REST port (Triton's default is 8000). 0 picks a free port and logs it. When
    /// not given: 8000, or a free port when --grpc-port is 0 or 8000 is taken (logged as a
    /// warning): several servers on one host that set their other ports and not this one.
    #[arg(long, env = "INFERMESH_HTTP_PORT")]
    pub http_port: Option<u16>,

    /// Serve grpc.health.v1 alone, in plaintext, on <health-address>:<health-port>: the
    /// port for Kubernetes gRPC probes and load balancers, which cannot speak TLS or send
    /// credentials. Same statuses as on the gRPC port; nothing else is served there.
    #[arg(long, env = "INFERMESH_ALLOW_HEALTH_PORT", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_health_port: bool,

    /// Address the health port binds; default: --grpc-address.
    #[arg(long, env = "INFERMESH_HEALTH_ADDRESS")]
    pub health_address: Option<IpAddr>,

    /// Health port. 0 picks a free port and logs it.
    #[arg(long, env = "INFERMESH_HEALTH_PORT", default_value_t = 8003)]
    pub health_port: u16,

    /// Connections the health port holds open at once, apart from --max-connections: the
    /// main port's traffic can never starve a probe.
    #[arg(long, env = "INFERMESH_HEALTH_MAX_CONNECTIONS", default_value_t = 256)]
    pub health_max_connections: usize,

    /// Connections one peer address may hold open on the health port (a kubelet probes
    /// from its node's address, one connection per probe). 0 = no per-peer cap.
    #[arg(
        long,
        env = "INFERMESH_HEALTH_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 8
    )]
    pub health_max_connections_per_peer: usize,

    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,

    /// Largest gRPC message accepted or sent, in bytes (Triton accepts up to 2 GiB; raise it
    /// for larger tensors). A larger request is answered RESOURCE_EXHAUSTED from its 5-byte
    /// prefix, before any of it is buffered.
    #[arg(long, env = "INFERMESH_GRPC_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub grpc_max_message_bytes: usize,

    /// HTTP/2 streams (calls) one connection may have open at once, advertised to clients
    /// in SETTINGS; a client that opens more gets them refused.
    #[arg(
        long,
        env = "INFERMESH_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub grpc_max_concurrent_streams: u32,

    /// Connections open at once; one beyond is closed as soon as it is accepted.
    #[arg(long, env = "INFERMESH_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// A connection whose TLS handshake, HTTP/2 preface and whole first SETTINGS frame
    /// have not arrived within this long after it was accepted is closed, and so is one
    /// that opens no call within this long after its handshake (half-open handshakes and
    /// silent connections hold nothing). 0 = never.
    #[arg(long, env = "INFERMESH_GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_handshake_timeout: Duration,

    /// How often the server PINGs each connection (Triton's flag name); a peer that does
    /// not answer within --grpc-keepalive-timeout is dropped. 0 = no pings.
    #[arg(long, env = "INFERMESH_GRPC_KEEPALIVE_TIME", default_value = "30s", value_parser = parse_duration)]
    pub grpc_keepalive_time: Duration,

    /// How long a keepalive PING may go unanswered before the connection is closed.
    #[arg(long, env = "INFERMESH_GRPC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout: Duration,

    /// A connection with no call open for this long is closed (keepalive pings do not
    /// count as use). 0 = never.
    #[arg(long, env = "INFERMESH_GRPC_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub grpc_idle_timeout: Duration,

    /// A request message that stops arriving part-way (no bytes for this long) is dropped
    /// and its bytes released, so slow senders cannot pin memory. 0 = never.
    #[arg(long, env = "INFERMESH_GRPC_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub grpc_stall_timeout: Duration,

    /// Bytes per second a request message in progress must keep up, measured over each
    /// --grpc-stall-timeout window; a message trickled more slowly is dropped with its
    /// bytes (DEADLINE_EXCEEDED). 0 = any progress will do.
    #[arg(long, env = "INFERMESH_GRPC_MIN_RECEIVE_RATE", default_value_t = 1024)]
    pub grpc_min_receive_rate: usize,

    /// After SIGTERM, how long to keep serving while health already says NOT_SERVING, so
    /// Kubernetes endpoints and gateways stop sending before new requests are refused.
    #[arg(long, env = "INFERMESH_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// After the grace period, how long in-flight requests and open streams get to finish
    /// before the process exits anyway.
    #[arg(long, env = "INFERMESH_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Close each client connection (with GOAWAY, after its requests finish) once it is this
    /// old, so long-lived clients re-balance across replicas and no connection outlives its
    /// credentials' review for long. 0 keeps connections forever.
    #[arg(long, env = "INFERMESH_MAX_CONNECTION_AGE", default_value = "1h", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// Threads serving gRPC. 1 runs everything on one thread (no cross-thread wake-ups: the
    /// least CPU per request, as Linkerd's proxy does by default). 0 = automatic: on the
    /// gateway 1 up to 2 cores, else one per core; a quarter of the cores (at least 1) on
    /// the worker, whose models run on ONNX Runtime's threads.
    #[arg(long, env = "INFERMESH_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Log format: "text" for people, "json" for log pipelines. The filter is RUST_LOG.
    #[arg(long, env = "INFERMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,

    #[command(flatten)]
    pub trace: crate::trace::TraceArgs,
}

/// Parses "250ms", "5s", "2m", "1h", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration; expected e.g. 250ms, 5s, 2m"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("'{s}': unknown unit '{other}'; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is not a duration we can hold"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
