//! Request deadlines: gRPC's `grpc-timeout` header and Triton's `timeout` request
//! parameter (microseconds); the earlier wins. Both are client-controlled, so a value too
//! large for the clock means "no deadline", never an overflow.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// Parses a `grpc-timeout` value as the gRPC spec defines it: 1 to 8 ASCII digits and a
/// unit (H, M, S, m, u, n). Anything else is `None` (the header is ignored).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // Split off the last byte only if it is a whole character (an ASCII unit).
    let at = v
        .len()
        .checked_sub(1)
        .filter(|&at| v.is_char_boundary(at))?;
    let (digits, unit) = v.split_at(at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
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

/// `start + d`, or no deadline when that is beyond what the clock can hold.
pub fn after(start: Instant, d: Duration) -> Option<Instant> {
    start.checked_add(d)
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
        .and_then(parse_grpc_timeout)
        .and_then(|d| after(start, d));
    earlier(header, param_after(timeout_param_us, start))
}

/// A request's deadline: `outer` (its call's `grpc-timeout`, or its stream's) or its own
/// `timeout` parameter counted from `start`, whichever is earlier.
pub fn of_request(
    outer: Option<Instant>,
    parameters: &crate::raw::Parameters,
    start: Instant,
) -> Option<Instant> {
    let own = parameters.get("timeout").and_then(timeout_param);
    earlier(outer, param_after(own, start))
}

/// A positive `timeout` parameter's microseconds after `start`; none for anything else.
fn param_after(us: Option<i64>, start: Instant) -> Option<Instant> {
    us.filter(|&us| us > 0)
        .and_then(|us| after(start, Duration::from_micros(us as u64)))
}

fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Triton's `timeout` parameter as microseconds: int64 or uint64 (clamped), else `None`.
pub fn timeout_param(p: &infermesh_proto::InferParameter) -> Option<i64> {
    use infermesh_proto::infer_parameter::ParameterChoice;
    match p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => Some(v),
        Some(ParameterChoice::Uint64Param(v)) => Some(v.min(i64::MAX as u64) as i64),
        _ => None,
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
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "x",
            "",
            "S",
            "123456789S",
            "18446744073709551615S",
            "+5S",
            "-1S",
            "1s",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_deadline_beyond_the_clock_is_no_deadline() {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "99999999H".parse().unwrap());
        let t0 = Instant::now();
        // 11,000 years fits an Instant on Linux; the parameter's i64::MAX µs may not.
        let _ = deadline(&md, Some(i64::MAX), t0);
        assert_eq!(after(t0, Duration::MAX), None);
    }

    #[test]
    fn a_request_s_own_timeout_and_its_call_s_the_earlier_wins() {
        use infermesh_proto::{infer_parameter::ParameterChoice, InferParameter};
        let t0 = Instant::now();
        let mut req = infermesh_proto::ModelInferRequest::default();
        assert_eq!(of_request(None, &req.parameters, t0), None);
        let outer = t0 + Duration::from_secs(1);
        assert_eq!(of_request(Some(outer), &req.parameters, t0), Some(outer));
        let param = |v| InferParameter {
            parameter_choice: Some(v),
        };
        req.parameters.insert(
            "timeout".into(),
            param(ParameterChoice::Int64Param(200_000)),
        );
        let own = t0 + Duration::from_millis(200);
        assert_eq!(of_request(None, &req.parameters, t0), Some(own));
        assert_eq!(of_request(Some(outer), &req.parameters, t0), Some(own));
        let sooner = t0 + Duration::from_millis(50);
        assert_eq!(of_request(Some(sooner), &req.parameters, t0), Some(sooner));
        // Zero, negative or another type: no deadline of its own.
        for bad in [
            ParameterChoice::Int64Param(0),
            ParameterChoice::Int64Param(-5),
            ParameterChoice::StringParam("100".into()),
        ] {
            req.parameters.insert("timeout".into(), param(bad));
            assert_eq!(of_request(None, &req.parameters, t0), None);
        }
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
