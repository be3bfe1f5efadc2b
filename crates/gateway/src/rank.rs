//! Rendezvous (highest-random-weight) ranking of workers for a model: each worker scores
//! `hash(model, worker)` and the ranking is the scores in descending order. Every gateway
//! replica computes the same ranking from the same worker addresses, with no shared
//! store; a worker that leaves moves only the models it ranked first for, and one that
//! joins takes only the models it now ranks first for. The hash is fixed here (FNV-1a,
//! then a SplitMix64 finish), never the standard library's, whose output may change
//! between releases and would split the replicas' rankings.

/// A well-mixed 64-bit score of `(model, worker)`.
pub fn score(model: &str, worker: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in model.bytes().chain([0u8]).chain(worker.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64's finaliser: FNV alone leaves nearby inputs' scores close.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// `workers` ranked for `model`, best first (ties, never expected, by address).
pub fn rank<'a>(model: &str, workers: &[&'a str]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = workers.iter().map(|w| (score(model, w), *w)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, w)| w).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8001")).collect()
    }

    #[test]
    fn every_replica_ranks_alike_whatever_order_it_learned_the_workers_in() {
        let w = workers(8);
        let forward: Vec<&str> = w.iter().map(String::as_str).collect();
        let backward: Vec<&str> = w.iter().rev().map(String::as_str).collect();
        for m in 0..50 {
            let model = format!("model-{m}");
            assert_eq!(rank(&model, &forward), rank(&model, &backward));
        }
        // Pinned values: a change to the hash would split replicas of different builds.
        assert_eq!(score("mlp", "10.0.0.1:8001"), 0x845ebb8239c62f84);
    }

    #[test]
    fn a_leaving_worker_moves_only_its_own_models() {
        let w = workers(10);
        let all: Vec<&str> = w.iter().map(String::as_str).collect();
        let without: Vec<&str> = all.iter().copied().filter(|a| *a != all[3]).collect();
        let models: Vec<String> = (0..1000).map(|m| format!("m{m}")).collect();
        let mut moved = 0;
        for m in &models {
            let before = rank(m, &all)[0];
            let after = rank(m, &without)[0];
            if before != after {
                assert_eq!(before, all[3], "{m} moved off a worker that stayed");
                moved += 1;
            }
        }
        // About a tenth of the models were first on the leaving worker.
        assert!((50..=150).contains(&moved), "{moved}");
    }

    #[test]
    fn first_places_spread_evenly() {
        let w = workers(4);
        let all: Vec<&str> = w.iter().map(String::as_str).collect();
        let mut firsts = [0usize; 4];
        for m in 0..4000 {
            let top = rank(&format!("model-{m}"), &all)[0];
            firsts[all.iter().position(|a| *a == top).unwrap()] += 1;
        }
        assert!(
            firsts.iter().all(|&n| (800..=1200).contains(&n)),
            "{firsts:?}"
        );
    }
}
