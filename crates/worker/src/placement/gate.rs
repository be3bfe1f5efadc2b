//! One model load at a time (so what a load adds to the resident set is that load's),
//! with loads a request asked for going before the others (start-up, repository polls).

use std::{collections::VecDeque, sync::Mutex};

use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A RepositoryModelLoad (a gateway placing a model for a request waiting on it).
    Request,
    /// Loads at start and from repository polls.
    Background,
}

#[derive(Default)]
struct State {
    busy: bool,
    requests: VecDeque<oneshot::Sender<()>>,
    background: VecDeque<oneshot::Sender<()>>,
}

#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
}

/// The turn to load; the next waiter's turn comes when it is dropped.
pub struct Turn<'a>(&'a Gate);

impl Gate {
    pub async fn turn(&self, priority: Priority) -> Turn<'_> {
        let rx = {
            let mut s = self.state.lock().expect("gate lock");
            if !s.busy {
                s.busy = true;
                return Turn(self);
            }
            let (tx, rx) = oneshot::channel();
            match priority {
                Priority::Request => s.requests.push_back(tx),
                Priority::Background => s.background.push_back(tx),
            }
            rx
        };
        // The turn is handed over with `busy` still set: nobody can slip in between.
        let _ = rx.await;
        Turn(self)
    }

    fn release(&self) {
        let mut s = self.state.lock().expect("gate lock");
        loop {
            let next = s.requests.pop_front().or_else(|| s.background.pop_front());
            match next {
                // A waiter that went away (its caller cancelled) passes the turn on.
                Some(tx) => {
                    if tx.send(()).is_ok() {
                        return;
                    }
                }
                None => {
                    s.busy = false;
                    return;
                }
            }
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn requests_go_before_background_loads_and_one_runs_at_a_time() {
        let gate = Arc::new(Gate::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = gate.turn(Priority::Background).await;
        let mut waiting = Vec::new();
        for (name, p) in [
            ("bg1", Priority::Background),
            ("req1", Priority::Request),
            ("bg2", Priority::Background),
            ("req2", Priority::Request),
        ] {
            let (gate, order) = (gate.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _turn = gate.turn(p).await;
                order.lock().unwrap().push(name);
            }));
            tokio::task::yield_now().await;
        }
        // Everyone has queued behind `first`.
        let queued = |g: &Gate| {
            let s = g.state.lock().unwrap();
            s.requests.len() + s.background.len()
        };
        while queued(&gate) < 4 {
            tokio::task::yield_now().await;
        }
        drop(first);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["req1", "req2", "bg1", "bg2"]);
        assert!(!gate.state.lock().unwrap().busy);
    }
}
