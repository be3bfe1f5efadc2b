//! Sleeps that end within tens of microseconds of their instant. tokio's timer ticks in
//! whole milliseconds and rounds a sleep up to the next tick, so a 200 µs wait takes a
//! millisecond or more. The precise part is done by one thread for the process, parked on a
//! condvar with the earliest instant as its timeout and a timer slack of 1 ns (Linux adds
//! 50 µs by default); only the last stretch of a wait goes through it, the rest sleeps on
//! tokio's timer. Costs no CPU while waiting: nothing spins.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, OnceLock,
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

/// How much of a wait is left to the precise thread: more than tokio's tick, so that its
/// rounding up always ends before the instant.
const PRECISE_STRETCH: Duration = Duration::from_millis(2);

/// Waits until `until`, ending no earlier and within tens of microseconds after it.
pub async fn sleep_until(until: Instant) {
    if let Some(coarse) = until.checked_sub(PRECISE_STRETCH) {
        if coarse > Instant::now() {
            tokio::time::sleep_until(coarse.into()).await;
        }
    }
    PreciseSleep { until, entry: None }.await;
}

struct Entry {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Entry {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().expect("waker lock").take() {
            w.wake();
        }
    }
}

struct Due(Instant, u64, Arc<Entry>);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

#[derive(Default)]
struct Queue {
    /// Earliest first. A dropped sleep's entry stays until its instant (at most
    /// PRECISE_STRETCH away), then is fired into nothing.
    due: BinaryHeap<Reverse<Due>>,
    seq: u64,
}

struct Wheel {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn wheel() -> &'static Wheel {
    static WHEEL: OnceLock<&'static Wheel> = OnceLock::new();
    WHEEL.get_or_init(|| {
        let w: &'static Wheel = Box::leak(Box::new(Wheel {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("precise-timer".into())
            .spawn(move || run(w))
            .expect("spawn the precise timer thread");
        w
    })
}

fn run(w: &'static Wheel) {
    fine_timer_slack();
    let mut q = w.queue.lock().expect("timer lock");
    loop {
        let now = Instant::now();
        while q.due.peek().is_some_and(|Reverse(d)| d.0 <= now) {
            let Reverse(d) = q.due.pop().expect("peeked");
            d.2.fire();
        }
        q = match q.due.peek() {
            Some(Reverse(d)) => {
                let left = d.0.saturating_duration_since(now);
                w.changed.wait_timeout(q, left).expect("timer lock").0
            }
            None => w.changed.wait(q).expect("timer lock"),
        };
    }
}

/// Linux lets a sleeping thread's timer fire up to its "timer slack" late (50 µs by
/// default) to batch wakeups; this thread exists to be punctual.
#[allow(unsafe_code)]
fn fine_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only this thread's slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

struct PreciseSleep {
    until: Instant,
    entry: Option<Arc<Entry>>,
}

impl Future for PreciseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.until {
            return Poll::Ready(());
        }
        match &self.entry {
            Some(e) => {
                if e.fired.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                *e.waker.lock().expect("waker lock") = Some(cx.waker().clone());
                // Fired between the check and the store: its wake found no waker.
                if e.fired.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
            }
            None => {
                let e = Arc::new(Entry {
                    fired: AtomicBool::new(false),
                    waker: Mutex::new(Some(cx.waker().clone())),
                });
                let w = wheel();
                let mut q = w.queue.lock().expect("timer lock");
                q.seq += 1;
                let seq = q.seq;
                let earliest = q.due.peek().is_none_or(|Reverse(d)| self.until < d.0);
                q.due.push(Reverse(Due(self.until, seq, e.clone())));
                drop(q);
                if earliest {
                    w.changed.notify_one();
                }
                self.entry = Some(e);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sleep_never_ends_early_and_ends_soon_after() {
        let mut late = Vec::new();
        for micros in [50u64, 200, 900, 2500] {
            let until = Instant::now() + Duration::from_micros(micros);
            sleep_until(until).await;
            let now = Instant::now();
            assert!(now >= until, "ended {:?} early", until - now);
            late.push(now - until);
        }
        // Generous: a loaded CI machine may deschedule the thread; tokio alone is ~1 ms late.
        late.sort();
        assert!(late[1] < Duration::from_millis(5), "{late:?}");
    }

    #[tokio::test]
    async fn many_sleeps_all_end_and_a_dropped_one_harms_nothing() {
        let start = Instant::now();
        drop(Box::pin(sleep_until(start + Duration::from_micros(100))));
        let mut dropped = Box::pin(sleep_until(start + Duration::from_micros(150)));
        let _ = futures::poll!(dropped.as_mut());
        drop(dropped);
        let all = (0..50u64).map(|i| sleep_until(start + Duration::from_micros(20 * i)));
        futures::future::join_all(all).await;
        assert!(Instant::now() >= start + Duration::from_micros(980));
    }
}
