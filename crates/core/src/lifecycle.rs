//! Health and admission state of one server: what `grpc.health.v1` says, and whether new
//! requests are still taken. Health tells the truth: NOT_SERVING until ready, and again as
//! soon as shutdown starts.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::sync::Mutex;
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::Error;

/// The health service name that only says the process is alive.
pub const LIVENESS: &str = "liveness";

#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    reporter: HealthReporter,
    /// Last status wanted for each health service name; the lock also orders updates so a
    /// late `set_serving` cannot undo `drain`.
    wanted: Mutex<BTreeMap<String, bool>>,
    draining: AtomicBool,
    refusing: AtomicBool,
    /// Wakes long-lived streams (a placement Watch) that must end when refusing starts,
    /// or the drain would wait the whole --drain-timeout for them.
    refused: tokio::sync::watch::Sender<bool>,
}

impl Lifecycle {
    /// A lifecycle whose overall ("") health is NOT_SERVING until [`Lifecycle::set`].
    pub async fn new(reporter: HealthReporter) -> Self {
        let lc = Self {
            inner: Arc::new(Inner {
                reporter,
                wanted: Mutex::new(BTreeMap::new()),
                draining: AtomicBool::new(false),
                refusing: AtomicBool::new(false),
                refused: tokio::sync::watch::Sender::new(false),
            }),
        };
        lc.set("", false).await;
        // For liveness probes: SERVING while the process answers at all, untouched by
        // loading or draining (a liveness probe on "" would restart a pod that is only
        // loading models or draining).
        lc.publish(LIVENESS, true).await;
        lc
    }

    /// Reports `service` ("" for the whole server) as SERVING or NOT_SERVING. While
    /// draining everything stays NOT_SERVING.
    pub async fn set(&self, service: &str, serving: bool) {
        let mut wanted = self.inner.wanted.lock().await;
        wanted.insert(service.to_string(), serving);
        let serving = serving && !self.is_draining();
        self.publish(service, serving).await;
    }

    /// Shutdown step 1: every health entry NOT_SERVING, requests still served.
    pub async fn drain(&self) {
        let wanted = self.inner.wanted.lock().await;
        self.inner.draining.store(true, Ordering::SeqCst);
        for name in wanted.keys() {
            self.publish(name, false).await;
        }
    }

    /// Shutdown step 2: new requests are answered UNAVAILABLE.
    pub fn refuse(&self) {
        self.inner.refusing.store(true, Ordering::SeqCst);
        self.inner.refused.send_replace(true);
    }

    /// Resolves once new requests are refused (shutdown step 2).
    pub async fn refusing(&self) {
        let mut rx = self.inner.refused.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Admission check at the top of every handler.
    pub fn admit(&self) -> Result<(), Error> {
        if self.inner.refusing.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "server is shutting down; retry on another replica".into(),
            )
            .because(crate::Reason::Draining));
        }
        Ok(())
    }

    async fn publish(&self, service: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.inner
            .reporter
            .set_service_status(service, status)
            .await;
    }
}
