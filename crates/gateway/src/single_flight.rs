//! Single flight: concurrent identical fan-out calls (RepositoryIndex, ModelStatistics)
//! share one round of worker calls instead of each making one per worker, so a flood of
//! them costs the workers one call each at a time. Nothing is cached: a call that starts
//! after a round ended starts a round of its own.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};

type Round<T> = Shared<BoxFuture<'static, T>>;

pub struct SingleFlight<T: Clone> {
    /// The round in flight, if any, with its number.
    current: Mutex<Option<(u64, Round<T>)>>,
    next: AtomicU64,
}

impl<T: Clone> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            current: Mutex::new(None),
            next: AtomicU64::new(0),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// The result of the round in flight, or of a new one made by `start`.
    pub async fn run<F>(&self, start: impl FnOnce() -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (n, round) = {
            let mut current = self.current.lock().expect("single flight lock");
            match &*current {
                Some((n, round)) => (*n, round.clone()),
                None => {
                    let n = self.next.fetch_add(1, Ordering::Relaxed);
                    let round = start().boxed().shared();
                    *current = Some((n, round.clone()));
                    (n, round)
                }
            }
        };
        let out = round.await;
        let mut current = self.current.lock().expect("single flight lock");
        if current.as_ref().is_some_and(|(m, _)| *m == n) {
            *current = None; // ended: the next call starts afresh
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{atomic::AtomicUsize, Arc};

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_one_round_and_later_ones_start_another() {
        let flight = Arc::new(SingleFlight::<usize>::default());
        let rounds = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let gate = gate.shared();
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let (flight, rounds, gate) = (flight.clone(), rounds.clone(), gate.clone());
                tokio::spawn(async move {
                    flight
                        .run(|| async move {
                            let _ = gate.await;
                            rounds.fetch_add(1, Ordering::SeqCst) + 1
                        })
                        .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        release.send(()).unwrap();
        for c in calls {
            assert_eq!(c.await.unwrap(), 1, "every caller got the first round");
        }
        let later = flight
            .run(|| {
                let rounds = rounds.clone();
                async move { rounds.fetch_add(1, Ordering::SeqCst) + 1 }
            })
            .await;
        assert_eq!(later, 2, "a call after the round ended makes its own");
    }
}
