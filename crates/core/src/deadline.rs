//! Request deadlines: gRPC's `grpc-timeout` header and Triton's `timeout` request
//! parameter (microseconds); the earlier wins.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's deadline from its metadata and its `timeout` parameter (µs), if any.
pub fn deadline(
    metadata: &MetadataMap,
    timeout_param_us: Option<i64>,
    start: Instant,
) -> Option<Instant> {
    let header = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let param = timeout_param_us
        .filter(|&us| us > 0)
        .map(|us| Duration::from_micros(us as u64));
    match (header, param) {
        (Some(a), Some(b)) => Some(start + a.min(b)),
        (a, b) => a.or(b).map(|d| start + d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn earlier_deadline_wins() {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "1S".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!(
            deadline(&md, Some(500_000), t0),
            Some(t0 + Duration::from_millis(500))
        );
        assert_eq!(deadline(&md, None, t0), Some(t0 + Duration::from_secs(1)));
        assert_eq!(deadline(&MetadataMap::new(), None, t0), None);
    }
}
