//! Opt-in busy polling (`--busy-poll-us`): for a while after each request the runtime
//! keeps polling its sockets instead of sleeping. On a VM, waking a sleeping thread on
//! another core costs tens of microseconds (an inter-processor interrupt and a VM exit,
//! paid inside the sender's write); a thread that is still polling needs no wake-up. It
//! trades CPU for latency at low load, as Linux's `busy_poll` does; under load the runtime
//! is busy anyway and nothing spins.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

struct Spin {
    window: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the last request activity.
    last: AtomicU64,
    wake: Notify,
}

static SPIN: OnceLock<Spin> = OnceLock::new();

/// Starts the spinner on the current runtime; a window of zero does nothing.
pub fn start(window: Duration) {
    if window.is_zero() {
        return;
    }
    let spin = SPIN.get_or_init(|| Spin {
        window,
        epoch: Instant::now(),
        last: AtomicU64::new(0),
        wake: Notify::new(),
    });
    tokio::spawn(async move {
        loop {
            // `touch` on another thread may have stored a later instant than this read.
            let idle = (spin.epoch.elapsed().as_nanos() as u64)
                .saturating_sub(spin.last.load(Ordering::Relaxed));
            if Duration::from_nanos(idle) < spin.window {
                // Back of the queue: the runtime polls its sockets (without sleeping)
                // before it comes back here.
                tokio::task::yield_now().await;
            } else {
                spin.wake.notified().await;
            }
        }
    });
}

/// Marks request activity: the runtime spins for the window from now.
pub fn touch() {
    if let Some(spin) = SPIN.get() {
        let now = spin.epoch.elapsed().as_nanos() as u64;
        let before = spin.last.swap(now, Ordering::Relaxed);
        if Duration::from_nanos(now.saturating_sub(before)) >= spin.window {
            spin.wake.notify_one();
        }
    }
}
