//! The budget that keeps retries (which failures are retried: `failure`) from
//! multiplying load when every worker is failing: tower's `TpsBudget`, the design
//! Linkerd uses. Each request deposits `ratio` of a retry for 10 s, each retry withdraws
//! one, and a floor of 10 retries per second keeps a trickle possible at low traffic.

use std::time::Duration;

pub use tower::retry::budget::TpsBudget as Budget;

/// How long a deposit counts (tower and Linkerd use 10 s), so a worker dying with many
/// requests in flight can have them all retried.
const WINDOW: Duration = Duration::from_secs(10);

/// Retries always allowed per second, whatever the traffic.
const FLOOR_PER_SEC: u32 = 10;

/// `ratio` retries per request on top of the floor; `ratio` is checked by the flag's
/// parser (0..=1000, as tower requires).
pub fn budget(ratio: f64) -> Budget {
    Budget::new(WINDOW, FLOOR_PER_SEC, ratio as f32)
}

/// `--retry-budget-ratio`: a number tower's budget accepts.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1000.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is outside 0..=1000"))
    }
}

#[cfg(test)]
mod tests {
    use tower::retry::budget::Budget as _;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_by_the_ratio_plus_a_floor() {
        let b = budget(0.2);
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        // 1000 requests × 0.2, plus the floor's reserve (10/s over the 10 s window).
        assert!((200..=300).contains(&retries), "{retries}");
        assert!(parse_ratio("1001").is_err() && parse_ratio("-1").is_err());
        assert_eq!(parse_ratio("0.5"), Ok(0.5));
    }
}
