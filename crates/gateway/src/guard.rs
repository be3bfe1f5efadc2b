//! The routing file's `guard`: automatic rollback of a split. Over a sliding window of
//! one-second buckets it counts the requests that reached the guarded version (client
//! requests and shadow copies alike), their engine and timeout errors, and the shadow
//! comparisons whose target was that version. Once the window holds `min_requests`, an
//! error rate above `max_error_rate` or an agreement below `min_agreement` takes the
//! version out of the split (its weight in force goes to 0, the rest of the split takes
//! its share) until the model's entry in the file changes. It never takes out the last
//! version with weight: it logs and counts that it would have. Each gateway replica
//! decides from its own traffic.

use std::{
    collections::VecDeque,
    sync::{Mutex, OnceLock},
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;
use tonic::{Code, Status};

use crate::{failure::Failure, routes::rules, routes::split::Split};

/// Why a guard tripped (the `why` label of the rollback metrics).
pub const WHYS: [&str; 2] = ["error_rate", "agreement"];

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Bucket {
    second: u64,
    requests: u64,
    errors: u64,
    agree: u64,
    compared: u64,
}

/// The guard's counts over its window, for `infermesh routes`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub requests: u64,
    pub errors: u64,
    pub compared: u64,
    pub agree: u64,
    pub armed: bool,
    /// Set once tripped: why, with the numbers that tripped it.
    pub tripped: Option<String>,
    /// Set when it would have tripped but the version was the last with weight.
    pub withheld: Option<String>,
}

/// One model's guard, kept while the model's entry in the routing file is unchanged.
#[derive(Debug)]
pub struct Guard {
    pub rule: rules::Guard,
    model: String,
    start: Instant,
    window: Mutex<VecDeque<Bucket>>,
    tripped: OnceLock<String>,
    withheld: OnceLock<String>,
    /// Indexed as WHYS.
    pub rollbacks: [Counter; 2],
    pub withheld_count: [Counter; 2],
}

/// What an attempt at the guarded version says about it: `Some(true)` an engine or
/// timeout error, `Some(false)` an answer, `None` nothing about the version (the client's
/// own mistake, or a request that did not run there: busy, draining).
pub fn judged(status: Option<&Status>, failure: Option<Failure>) -> Option<bool> {
    let Some(status) = status else {
        return Some(false);
    };
    match failure {
        Some(Failure::TimedOut | Failure::Broken) => return Some(true),
        // The client's own deadline was too short to judge the version by.
        Some(Failure::OutOfTime) => return None,
        _ => {}
    }
    match status.code() {
        Code::Internal | Code::Unknown | Code::DataLoss | Code::DeadlineExceeded => Some(true),
        _ => None,
    }
}

impl Guard {
    pub fn new(
        model: &str,
        rule: rules::Guard,
        rollbacks: [Counter; 2],
        withheld: [Counter; 2],
    ) -> Self {
        Self {
            rule,
            model: model.to_string(),
            start: Instant::now(),
            window: Mutex::new(VecDeque::new()),
            tripped: OnceLock::new(),
            withheld: OnceLock::new(),
            rollbacks,
            withheld_count: withheld,
        }
    }

    /// An attempt at the guarded version (see [`judged`]).
    pub fn attempted(&self, error: Option<bool>, split: Option<&Split>) {
        if let Some(error) = error {
            self.add(split, |b| {
                b.requests += 1;
                b.errors += u64::from(error);
            });
        }
    }

    /// A shadow comparison whose target was the guarded version.
    pub fn compared(&self, agree: bool, split: Option<&Split>) {
        self.add(split, |b| {
            b.compared += 1;
            b.agree += u64::from(agree);
        });
    }

    pub fn view(&self) -> View {
        let sum = self.sum(None);
        View {
            requests: sum.requests,
            errors: sum.errors,
            compared: sum.compared,
            agree: sum.agree,
            armed: sum.requests >= self.rule.min_requests,
            tripped: self.tripped.get().cloned(),
            withheld: self.withheld.get().cloned(),
        }
    }

    pub fn is_tripped(&self) -> bool {
        self.tripped.get().is_some()
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// The window's sum, after `change` was made to this second's bucket.
    fn sum(&self, change: Option<&dyn Fn(&mut Bucket)>) -> Bucket {
        let now = self.now();
        let mut window = self.window.lock().expect("guard lock");
        let oldest = now.saturating_sub(u64::from(self.rule.window_s) - 1);
        while window.front().is_some_and(|b| b.second < oldest) {
            window.pop_front();
        }
        if let Some(change) = change {
            if window.back().is_none_or(|b| b.second != now) {
                window.push_back(Bucket {
                    second: now,
                    ..Default::default()
                });
            }
            change(window.back_mut().expect("a bucket"));
        }
        window.iter().fold(Bucket::default(), |s, b| Bucket {
            second: now,
            requests: s.requests + b.requests,
            errors: s.errors + b.errors,
            agree: s.agree + b.agree,
            compared: s.compared + b.compared,
        })
    }

    fn add(&self, split: Option<&Split>, change: impl Fn(&mut Bucket)) {
        if self.is_tripped() {
            return;
        }
        let sum = self.sum(Some(&change));
        if sum.requests < self.rule.min_requests {
            return;
        }
        let rate = sum.errors as f64 / sum.requests as f64;
        let agreement = (sum.compared > 0).then(|| sum.agree as f64 / sum.compared as f64);
        let why = match (self.rule.max_error_rate, self.rule.min_agreement, agreement) {
            (Some(max), _, _) if rate > max => Some((
                0,
                format!(
                    "error rate {rate:.4} ({} of {} requests in {}s) above max_error_rate {max}",
                    sum.errors, sum.requests, self.rule.window_s
                ),
            )),
            (_, Some(min), Some(a)) if a < min => Some((
                1,
                format!(
                "shadow agreement {a:.4} ({} of {} comparisons in {}s) below min_agreement {min}",
                sum.agree, sum.compared, self.rule.window_s
            ),
            )),
            _ => None,
        };
        if let (Some((why, detail)), Some(split)) = (why, split) {
            self.trip(why, detail, split);
        }
    }

    fn trip(&self, why: usize, detail: String, split: &Split) {
        let (model, version) = (&self.model, self.rule.version);
        if split.trip(version) {
            if self.tripped.set(format!("{}: {detail}", WHYS[why])).is_ok() {
                self.rollbacks[why].inc();
                tracing::warn!(model = %model, version, why = WHYS[why], "guard took version {version} out of the split: {detail}");
            }
        } else if self
            .withheld
            .set(format!("{}: {detail}", WHYS[why]))
            .is_ok()
        {
            self.withheld_count[why].inc();
            tracing::error!(model = %model, version, why = WHYS[why], "guard would take version {version} out of the split but it is the last version with weight; kept: {detail}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_error_rate: Option<f64>, min_agreement: Option<f64>) -> Guard {
        let rule = rules::Guard {
            version: 2,
            max_error_rate,
            min_agreement,
            window_s: 30,
            min_requests: 10,
        };
        Guard::new("m", rule, Default::default(), Default::default())
    }

    #[test]
    fn it_arms_at_min_requests_and_trips_on_errors() {
        let split = Split::new(vec![(1, 1), (2, 1)], false);
        let g = guard(Some(0.2), None);
        for _ in 0..5 {
            g.attempted(Some(true), Some(&split));
        }
        assert!(
            !g.view().armed && !g.is_tripped(),
            "not armed below 10 requests"
        );
        for _ in 0..4 {
            g.attempted(Some(false), Some(&split));
        }
        g.attempted(None, Some(&split)); // the client's mistake: not counted
        assert_eq!(g.view().requests, 9);
        g.attempted(Some(false), Some(&split));
        let v = g.view();
        assert!(
            v.armed
                && v.tripped
                    .as_deref()
                    .unwrap()
                    .starts_with("error_rate: error rate 0.5000 (5 of 10"),
            "{v:?}"
        );
        assert_eq!(g.rollbacks[0].get(), 1);
        assert!(split.is_off(2) && !split.is_off(1));
    }

    #[test]
    fn low_agreement_trips_and_the_last_version_is_kept() {
        let split = Split::new(vec![(1, 0), (2, 1)], false);
        let g = guard(None, Some(0.9));
        for i in 0..10 {
            g.attempted(Some(false), Some(&split));
            g.compared(i % 2 == 0, Some(&split));
        }
        let v = g.view();
        assert!(
            v.tripped.is_none() && v.withheld.as_deref().unwrap().starts_with("agreement"),
            "{v:?}"
        );
        assert_eq!((g.withheld_count[1].get(), g.rollbacks[1].get()), (1, 0));
        assert!(!split.is_off(2));
        assert_eq!(judged(Some(&Status::invalid_argument("x")), None), None);
        assert_eq!(judged(Some(&Status::internal("x")), None), Some(true));
        assert_eq!(judged(None, None), Some(false));
    }
}
