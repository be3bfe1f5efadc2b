//! A weighted split over versions: smooth weighted round-robin (nginx's), precomputed
//! once per routing file as a schedule of `total weight` slots and walked with one atomic
//! counter, so the pick takes no lock and 2,000 requests at 9:1 land 1,800 / 200 exactly
//! (up to what requests in flight reorder).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One model's split.
#[derive(Debug)]
pub struct Split {
    /// (version, weight), by version.
    pub weights: Vec<(i64, u32)>,
    /// Share a version's part among the others while it has no ready worker.
    pub fallback: bool,
    /// Index into `weights` for each slot.
    schedule: Vec<u8>,
    next: AtomicU64,
    /// For each version of `weights`: taken out of the split by its guard (weight 0 in
    /// force until the file's entry changes).
    off: Vec<AtomicBool>,
}

/// The version a request drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drawn {
    /// Its own draw.
    Version(i64),
    /// The draw's version has no ready worker; with `fallback` this one took its part.
    Fallback { drew: i64, to: i64 },
    /// The draw's version has no ready worker and the split has no fallback.
    Unavailable(i64),
}

impl Split {
    /// `weights`: versions with integer weights summing to 1..=MAX_TOTAL_WEIGHT (as the
    /// file reader checked), at most 255 of them.
    pub fn new(weights: Vec<(i64, u32)>, fallback: bool) -> Self {
        let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, (_, w)) in current.iter_mut().zip(&weights) {
                *c += i64::from(*w);
            }
            // The highest current value wins (the first on a tie) and gives back the total.
            let mut best = 0;
            for (i, c) in current.iter().enumerate() {
                if *c > current[best] {
                    best = i;
                }
            }
            current[best] -= total as i64;
            schedule.push(best as u8);
        }
        Self {
            off: weights.iter().map(|_| AtomicBool::new(false)).collect(),
            weights,
            fallback,
            schedule,
            next: AtomicU64::new(0),
        }
    }

    /// Takes `version` out of the split (its guard tripped); false, leaving it in, when no
    /// other version would be left with weight.
    pub fn trip(&self, version: i64) -> bool {
        let others = self
            .weights
            .iter()
            .zip(&self.off)
            .any(|((v, w), off)| *v != version && *w > 0 && !off.load(Ordering::Relaxed));
        let Some(i) = self.weights.iter().position(|(v, _)| *v == version) else {
            return false;
        };
        if others {
            self.off[i].store(true, Ordering::Relaxed);
        }
        others
    }

    /// Whether `version`'s guard took it out of the split.
    pub fn is_off(&self, version: i64) -> bool {
        self.weights
            .iter()
            .zip(&self.off)
            .any(|((v, _), off)| *v == version && off.load(Ordering::Relaxed))
    }

    /// The version of schedule slot `at` (mod its length).
    fn slot(&self, at: u64) -> (i64, bool) {
        let i = self.schedule[(at % self.schedule.len() as u64) as usize] as usize;
        (self.weights[i].0, self.off[i].load(Ordering::Relaxed))
    }

    /// The next slot from `at` whose version is in the split (a tripped version's slots
    /// pass to the slots after them, so the others share its part by weight).
    fn in_force(&self, at: u64) -> u64 {
        let n = self.schedule.len() as u64;
        (at..at + n).find(|a| !self.slot(*a).1).unwrap_or(at) % n
    }

    /// The version with the highest weight (the higher version on a tie): what metadata
    /// answers for.
    pub fn heaviest(&self) -> i64 {
        self.weights
            .iter()
            .filter(|(v, _)| !self.is_off(*v))
            .max_by_key(|(v, w)| (*w, *v))
            .map(|(v, _)| *v)
            .expect("a split has a version")
    }

    /// Draws the next version; `ready` says whether a version has a ready worker. With
    /// `fallback`, the slots after the draw are walked to the first ready version, which
    /// shares the part out in proportion to the weights.
    pub fn draw(&self, ready: impl Fn(i64) -> bool) -> Drawn {
        let n = self.schedule.len() as u64;
        let at = self.in_force(self.next.fetch_add(1, Ordering::Relaxed) % n);
        let drew = self.weights[self.schedule[at as usize] as usize].0;
        if ready(drew) {
            return Drawn::Version(drew);
        }
        if !self.fallback {
            return Drawn::Unavailable(drew);
        }
        (1..n)
            .map(|k| self.slot(at + k))
            .find(|(v, off)| !off && *v != drew && ready(*v))
            .map(|(v, _)| v)
            .map_or(Drawn::Unavailable(drew), |to| Drawn::Fallback { drew, to })
    }

    /// The next version by weight after `without` were given up on (a fallback split).
    pub fn other(&self, without: &[i64], ready: impl Fn(i64) -> bool) -> Option<i64> {
        if !self.fallback {
            return None;
        }
        let n = self.schedule.len() as u64;
        let at = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| self.slot(at + k))
            .find(|(v, off)| !off && !without.contains(v) && ready(*v))
            .map(|(v, _)| v)
    }

    /// The sum of the weights.
    pub fn total(&self) -> u32 {
        self.schedule.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn count(split: &Split, n: usize, ready: impl Fn(i64) -> bool) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            let key = match split.draw(&ready) {
                Drawn::Version(v) => v.to_string(),
                Drawn::Fallback { to, .. } => format!("{to} (fallback)"),
                Drawn::Unavailable(v) => format!("{v} unavailable"),
            };
            *seen.entry(key).or_default() += 1;
        }
        seen
    }

    #[test]
    fn weights_are_spread_exactly_and_smoothly() {
        let s = Split::new(vec![(1, 9), (2, 1)], false);
        let seen = count(&s, 2000, |_| true);
        assert_eq!((seen["1"], seen["2"]), (1800, 200));
        // Smooth: the light version's turns are spread out, never back to back.
        let s = Split::new(vec![(1, 5), (2, 1), (3, 1)], false);
        let order: Vec<i64> = (0..7)
            .map(|_| match s.draw(|_| true) {
                Drawn::Version(v) => v,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(order.iter().filter(|v| **v == 1).count(), 5);
        assert!(
            order.windows(2).all(|w| !(w[0] != 1 && w[1] != 1)),
            "{order:?}"
        );
        assert_eq!(s.heaviest(), 1);
        assert_eq!(Split::new(vec![(1, 1), (2, 1)], false).heaviest(), 2);
    }

    #[test]
    fn a_missing_version_fails_its_share_unless_fallback_shares_it() {
        let s = Split::new(vec![(1, 9), (2, 1)], false);
        let seen = count(&s, 1000, |v| v == 1);
        assert_eq!((seen["1"], seen["2 unavailable"]), (900, 100));
        let s = Split::new(vec![(1, 9), (2, 1)], true);
        let seen = count(&s, 1000, |v| v == 1);
        assert_eq!((seen["1"], seen["1 (fallback)"]), (900, 100));
        // Three versions, the heaviest gone: its part goes to the others by weight.
        let s = Split::new(vec![(1, 6), (2, 3), (3, 1)], true);
        let seen = count(&s, 1000, |v| v != 1);
        let (two, three) = (
            seen["2"] + seen.get("2 (fallback)").unwrap_or(&0),
            seen["3"] + seen.get("3 (fallback)").unwrap_or(&0),
        );
        assert_eq!(two + three, 1000);
        assert!((650..=850).contains(&two), "{seen:?}");
        assert!(matches!(s.draw(|_| false), Drawn::Unavailable(_)));
        assert_eq!(s.other(&[1, 2], |_| true), Some(3));
        assert_eq!(Split::new(vec![(1, 1)], false).other(&[], |_| true), None);
    }

    #[test]
    fn a_tripped_version_passes_its_part_to_the_others_but_the_last_one_stays() {
        let s = Split::new(vec![(1, 6), (2, 3), (3, 1)], false);
        assert!(s.trip(2));
        let seen = count(&s, 1000, |_| true);
        assert_eq!(seen.get("2"), None);
        assert_eq!(seen["1"] + seen["3"], 1000);
        assert!((750..=950).contains(&seen["1"]), "{seen:?}");
        assert!(s.trip(1));
        assert!(!s.trip(3), "the last version with weight stays");
        assert_eq!(count(&s, 10, |_| true)["3"], 10);
        assert_eq!(s.heaviest(), 3);
    }
}
