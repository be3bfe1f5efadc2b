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
    // Two distinct candidates drawn uniformly in one pass (a reservoir of two), so each
    // worker's state is read once and nothing is allocated per request.
    let (mut a, mut b, mut n) = (None, None, 0usize);
    for e in workers
        .iter()
        .filter(|e| e.serves(&target.model, Some(target.version)) && !tried.contains(&e.addr))
    {
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
