//! Balance: which worker serves a routed target — power of two choices over the load
//! estimate (PeakEWMA × outstanding, `load`), among the ready workers that have the
//! target's model version, skipping those this request already tried.

use std::sync::Arc;

use crate::{endpoint::Endpoint, route::Target};

/// The chosen worker, and whether another untried one has the target too; `None` when
/// no untried ready worker has it.
pub fn pick(
    workers: &[Arc<Endpoint>],
    target: &Target,
    tried: &[String],
) -> Option<(Arc<Endpoint>, bool)> {
    draw(workers, target, tried, false).or_else(|| draw(workers, target, tried, true))
}

/// `pick` over the workers that are not draining, or (`draining`) over every one: a
/// draining worker takes a model's requests only while no other worker holds it.
fn draw(
    workers: &[Arc<Endpoint>],
    target: &Target,
    tried: &[String],
    draining: bool,
) -> Option<(Arc<Endpoint>, bool)> {
    // Two distinct candidates drawn uniformly in one pass (a reservoir of two), so each
    // worker's state is read once and nothing is allocated per request.
    let (mut a, mut b, mut n) = (None, None, 0usize);
    for e in workers.iter().filter(|e| {
        e.takes(&target.model, Some(target.version), draining) && !tried.contains(&e.addr)
    }) {
        n += 1;
        match n {
            1 => a = Some(e),
            2 => b = Some(e),
            _ => match fastrand::usize(..n) {
                0 => a = Some(e),
                1 => b = Some(e),
                _ => {}
            },
        }
    }
    let chosen = match (a, b) {
        (Some(a), None) => a,
        (Some(a), Some(b)) => {
            let (ca, cb) = (a.load.cost(), b.load.cost());
            // The less loaded wins; a tie (idle workers) is a coin toss, or the first
            // worker found would take all the traffic at low load.
            if ca < cb || (ca == cb && fastrand::bool()) {
                a
            } else {
                b
            }
        }
        _ => return None,
    };
    Some((chosen.clone(), n > 1))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{endpoint::fakes, route::route};

    fn target(workers: &[Arc<Endpoint>], version: &str) -> Target {
        route(workers, "m", version, &Default::default()).unwrap()
    }

    /// Under paused time: after one slow and one fast round trip, p2c sends everything to
    /// the fast worker while it has no backlog, and spreads again once its backlog costs
    /// more.
    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_faster_and_less_loaded_worker() {
        let ws = fakes(1, 2, &[("m", &[1])]);
        let t = target(&ws, "");
        let slow = ws[0].load.start();
        let fast = ws[1].load.start();
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(fast);
        tokio::time::advance(Duration::from_millis(49)).await;
        drop(slow);
        for _ in 0..100 {
            assert_eq!(pick(&ws, &t, &[]).unwrap().0.addr, ws[1].addr);
        }
        // 60 requests outstanding on the fast one outweigh a 50× slower idle worker.
        let backlog: Vec<_> = (0..60).map(|_| ws[1].load.start()).collect();
        assert_eq!(pick(&ws, &t, &[]).unwrap().0.addr, ws[0].addr);
        drop(backlog);
    }

    #[tokio::test(start_paused = true)]
    async fn tried_workers_are_skipped_and_the_fallback_says_whether_one_is_left() {
        let ws = fakes(1, 3, &[("m", &[1])]);
        let t = target(&ws, "");
        let (first, more) = pick(&ws, &t, &[]).unwrap();
        assert!(more);
        let mut tried = vec![first.addr.clone()];
        let (second, more) = pick(&ws, &t, &tried).unwrap();
        assert!(second.addr != first.addr && more);
        tried.push(second.addr.clone());
        let (third, more) = pick(&ws, &t, &tried).unwrap();
        assert!(
            !tried.contains(&third.addr) && !more,
            "the last one: no fallback"
        );
        tried.push(third.addr.clone());
        assert!(pick(&ws, &t, &tried).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_workers_share_the_traffic_and_only_holders_of_the_version_get_it() {
        let mut ws = fakes(1, 2, &[("m", &[1, 2])]);
        ws.extend(fakes(3, 1, &[("m", &[1])]));
        let t = target(&ws, "");
        assert_eq!(t.version, 2);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..400 {
            *counts
                .entry(pick(&ws, &t, &[]).unwrap().0.addr.clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.get(&ws[2].addr), None, "127.0.0.3 has no version 2");
        // A tie between idle workers is a coin toss, not the first one found.
        for w in &ws[..2] {
            let n = counts.get(&w.addr).copied().unwrap_or(0);
            assert!(n > 100, "{} got {n} of 400", w.addr);
        }
    }
}
