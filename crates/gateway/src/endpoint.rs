//! One worker as the gateway sees it: a lazily connected HTTP/2 channel, its load
//! estimate, its readiness and ready (model, version) set refreshed in the background,
//! its ejection state, and the streams requests travel on to it (`upstream`).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient, RepositoryIndexRequest,
    ServerReadyRequest,
};
use tonic::transport::Channel;

use crate::{discovery::Discovered, failure::Failure, load::Load, metrics::WorkerMetrics};

mod follow;
pub mod upstream;
mod wire;

pub use follow::Held;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// What the gateway last learned from the worker.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub ready: bool,
    /// Ready versions per model.
    pub models: BTreeMap<String, BTreeSet<i64>>,
    /// Every model the worker lists, ready or not (tells NOT_FOUND from UNAVAILABLE).
    pub known: BTreeSet<String>,
    /// Every version of each model the worker lists, in any state.
    pub versions: BTreeMap<String, BTreeSet<i64>>,
    /// Why it is not ready, for error messages.
    pub problem: Option<String>,
    /// What its change stream said, while the stream is open (see `follow`).
    pub held: Option<Arc<Held>>,
    /// A placement-mode worker whose health said NOT_SERVING (its shutdown began): it
    /// still serves its models, only where no other worker holds them, until the gateway
    /// has loaded them elsewhere (see `placement::keeper`); nothing new is placed on it.
    pub draining: bool,
}

impl Seen {
    /// Takes one model version as an index or change stream lists it.
    pub fn list(&mut self, name: &str, version: &str, state: &str) {
        self.known.insert(name.to_string());
        let Ok(v) = version.parse::<i64>() else {
            return;
        };
        self.versions.entry(name.to_string()).or_default().insert(v);
        if state == "READY" {
            self.models.entry(name.to_string()).or_default().insert(v);
        }
    }

    /// Ready, not draining, and in placement mode: it can be asked to load models.
    pub fn takes_loads(&self) -> bool {
        self.ready && !self.draining && self.held.as_ref().is_some_and(|h| h.placing())
    }
}

pub struct Endpoint {
    pub addr: String,
    /// What discovery said about it (TLS server name, weight, zone).
    pub found: Discovered,
    pub client: Client,
    pub load: Load,
    channel: Channel,
    /// What the last poll (or failure) said: a snapshot, read on every pick without a lock.
    seen: ArcSwap<Seen>,
    /// Wakes the refresher early (the health watch saw the worker come back).
    wake: tokio::sync::Notify,
    ejection: std::sync::Mutex<Ejection>,
    pub metrics: WorkerMetrics,
    /// Attempts that timed out since its last answer.
    timeouts_in_a_row: std::sync::atomic::AtomicU32,
    /// Whether `ejection` holds anything a success must clear.
    ejected: std::sync::atomic::AtomicBool,
    /// The streams requests travel on to this worker (see `upstream`).
    pub streams: std::sync::Mutex<Vec<Arc<upstream::Upstream>>>,
    /// Bumped on every change of `seen`: what a wait for a model to be ready here awaits.
    changed: tokio::sync::watch::Sender<u64>,
}

/// One call in flight to a worker: counted in its load estimate and its gauges until
/// dropped (also when the call is cancelled).
pub struct Call<'a> {
    ep: &'a Endpoint,
    load: crate::load::InFlight<'a>,
}

impl Call<'_> {
    /// The attempt ended with an answer or a failure; a call dropped without this was cut
    /// short (see `load`).
    pub fn ended(mut self) {
        self.load.ended();
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.ep.metrics.outstanding.dec();
    }
}

impl Endpoint {
    pub fn call(&self) -> Call<'_> {
        self.metrics.attempts.inc();
        self.metrics.outstanding.inc();
        Call {
            ep: self,
            load: self.load.start(),
        }
    }
}

/// Outlier ejection: a worker whose calls fail at the transport level is kept out for a
/// backoff that doubles with each ejection in a row (1 s up to 30 s), and comes back only
/// when a poll after that answers ready; a call that succeeds resets the backoff.
#[derive(Debug, Default)]
struct Ejection {
    in_a_row: u32,
    until: Option<tokio::time::Instant>,
}

/// How the gateway connects to workers (`--worker-connect-timeout`,
/// `--worker-keepalive-interval`, `--worker-keepalive-timeout`).
#[derive(Clone, Debug)]
pub struct Connect {
    pub timeout: Duration,
    /// HTTP/2 PING this often on every worker connection, busy or idle: a worker that is
    /// blackholed or stopped answers nothing, and only a PING that goes unanswered tells.
    pub keepalive_interval: Duration,
    /// An unanswered PING closes the connection after this long: its calls fail at once
    /// (and are retried elsewhere) instead of waiting for their deadlines.
    pub keepalive_timeout: Duration,
    /// TLS to workers (`--worker-tls-*`); None: plaintext.
    pub tls: Option<infermesh_core::tls::ClientTls>,
}

impl Default for Connect {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            tls: None,
        }
    }
}

const EJECT_BASE: Duration = Duration::from_secs(1);
/// Attempts timing out in a row that make a worker an outlier (one may be bad luck).
const EJECT_AFTER_TIMEOUTS: u32 = 3;
const EJECT_MAX: Duration = Duration::from_secs(30);

impl Endpoint {
    pub fn new(
        found: impl Into<Discovered>,
        connect: &Connect,
        metrics: WorkerMetrics,
    ) -> Result<Arc<Self>, String> {
        let found = found.into();
        let addr = found.addr.as_str();
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| format!("bad worker address '{addr}': {e}"))?
            .connect_timeout(connect.timeout)
            .tcp_nodelay(true)
            // Far above any status message a worker sends (4 KiB, percent-encoded): a
            // header list over the limit would tear down the whole connection.
            .http2_max_header_list_size(256 * 1024)
            .http2_keep_alive_interval(connect.keepalive_interval)
            .keep_alive_timeout(connect.keepalive_timeout)
            .keep_alive_while_idle(true);
        let channel = match &connect.tls {
            Some(tls) => {
                endpoint.connect_with_connector_lazy(tls.connector(found.server_name.as_deref()))
            }
            None => endpoint.connect_lazy(),
        };
        let client = GrpcInferenceServiceClient::new(channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Ok(Arc::new(Self {
            addr: addr.to_string(),
            found,
            client,
            load: Load::default(),
            channel,
            seen: ArcSwap::default(),
            wake: tokio::sync::Notify::new(),
            ejection: Default::default(),
            timeouts_in_a_row: Default::default(),
            ejected: Default::default(),
            metrics,
            streams: Default::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }))
    }

    pub fn seen(&self) -> Seen {
        self.seen.load().as_ref().clone()
    }

    /// Whether it is in rotation at all.
    pub fn is_ready(&self) -> bool {
        self.seen.load().ready
    }

    /// Whether it is ready and serves `model` at `version` (None: any version).
    pub fn serves(&self, model: &str, version: Option<i64>) -> bool {
        self.takes(model, version, true)
    }

    /// `serves`, leaving out a draining worker unless `draining` (one read of its state).
    pub fn takes(&self, model: &str, version: Option<i64>, draining: bool) -> bool {
        let seen = self.seen.load();
        seen.ready
            && (draining || !seen.draining)
            && seen
                .models
                .get(model)
                .is_some_and(|v| version.is_none_or(|want| v.contains(&want)))
    }

    /// The newest ready version of `model` here.
    pub fn newest(&self, model: &str) -> Option<i64> {
        self.newest_except(model, &[])
    }

    /// The newest ready version of `model` here that is not one of `without`.
    pub fn newest_except(&self, model: &str, without: &[i64]) -> Option<i64> {
        let seen = self.seen.load();
        if !seen.ready {
            return None;
        }
        let versions = seen.models.get(model)?;
        versions
            .iter()
            .rev()
            .find(|v| !without.contains(v))
            .copied()
    }

    /// Whether it lists `version` of `model`, in any state.
    pub fn lists(&self, model: &str, version: i64) -> bool {
        self.seen
            .load()
            .versions
            .get(model)
            .is_some_and(|v| v.contains(&version))
    }

    pub fn knows(&self, model: &str) -> bool {
        self.seen.load().known.contains(model)
    }

    /// Whether it is ready, in placement mode, and lists `model`: it can be asked to load it.
    pub fn places(&self, model: &str) -> bool {
        let seen = self.seen.load();
        seen.takes_loads()
            && seen
                .held
                .as_ref()
                .is_some_and(|h| h.models.contains_key(model))
    }

    /// Whether it is draining its placed models (see `Seen::draining`).
    pub fn is_draining(&self) -> bool {
        self.seen.load().draining
    }

    /// What its change stream said, while the stream is open.
    pub fn held(&self) -> Option<Arc<Held>> {
        self.seen.load().held.clone()
    }

    /// Whether it runs in placement mode (as its change stream last said).
    pub fn placing(&self) -> bool {
        self.seen.load().held.as_ref().is_some_and(|h| h.placing())
    }

    /// Waits (at most `within`) until it serves `model` at `version`; whether it does.
    pub async fn wait_serving(&self, model: &str, version: Option<i64>, within: Duration) -> bool {
        let mut changed = self.changed.subscribe();
        let until = tokio::time::Instant::now() + within;
        loop {
            if self.serves(model, version) {
                return true;
            }
            match tokio::time::timeout_at(until, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.serves(model, version),
            }
        }
    }

    /// Learns from a failed call (see `failure`): a model that is gone comes off this
    /// worker until the next refresh; a broken connection ejects the worker for a backoff;
    /// a refusal takes it out until the next good poll; busy needs nothing.
    pub fn note_failure(&self, model: &str, failure: Failure, status: &tonic::Status) {
        let why = || format!("{:?}: {}", status.code(), status.message());
        match failure {
            Failure::ModelGone => {
                self.seen.rcu(|seen| {
                    let mut seen = seen.as_ref().clone();
                    seen.models.remove(model);
                    seen
                });
            }
            Failure::Broken => self.eject(why()),
            Failure::Refusing => self.mark_unready(why()),
            Failure::TimedOut => {
                let n = self
                    .timeouts_in_a_row
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if n >= EJECT_AFTER_TIMEOUTS {
                    self.timeouts_in_a_row
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    self.eject(format!("{n} attempts in a row timed out"));
                }
            }
            Failure::Busy | Failure::OutOfTime | Failure::Final => {}
        }
    }

    /// A call succeeded: the worker is healthy, so the next ejection starts short again.
    pub fn succeeded(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.timeouts_in_a_row.store(0, Relaxed);
        // The lock only after an ejection: every answer passes here.
        if self.ejected.load(Relaxed) {
            *self.ejection.lock().expect("ejection lock") = Ejection::default();
            self.ejected.store(false, Relaxed);
        }
    }

    fn eject(&self, why: String) {
        let backoff = {
            let mut e = self.ejection.lock().expect("ejection lock");
            let now = tokio::time::Instant::now();
            if e.until.is_some_and(|u| u > now) {
                return; // already out; in-flight failures of the same outage count once
            }
            e.in_a_row += 1;
            let backoff = EJECT_BASE
                .saturating_mul(1 << (e.in_a_row - 1).min(5))
                .min(EJECT_MAX);
            e.until = Some(now + backoff);
            self.ejected
                .store(true, std::sync::atomic::Ordering::Relaxed);
            backoff
        };
        self.metrics.ejections.inc();
        tracing::warn!(worker = %self.addr, ?backoff, reason = %why, "worker ejected");
        self.mark_unready(format!("ejected for {backoff:?} after {why}"));
    }

    /// Sets what the worker is known to serve (from a poll, or tests). An ejected worker
    /// stays out until its backoff has passed, whatever the poll says.
    pub fn set_seen(&self, seen: Seen) {
        self.store(|_| seen.clone());
    }

    /// Replaces `seen` with `next(current)` (the poll and the change stream both write
    /// through here), keeping an ejected worker out until its backoff has passed.
    fn store(&self, next: impl Fn(&Seen) -> Seen) {
        let until = self.ejection.lock().expect("ejection lock").until;
        let ejected = until.filter(|&u| u > tokio::time::Instant::now());
        let before = self.seen.rcu(|current| {
            let mut seen = next(current);
            if let Some(until) = ejected {
                seen.ready = false;
                seen.problem = Some(format!(
                    "ejected for another {:?}",
                    until.saturating_duration_since(tokio::time::Instant::now())
                ));
            }
            seen
        });
        let back = self.seen.load().ready;
        self.metrics.ready.set(back as i64);
        if back && !before.ready {
            // Back from a fault or an ejection: the latency it had then (a request that
            // hung) must not keep it shunned now.
            self.load.reset();
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Marks the worker out of rotation at once (e.g. it answered UNAVAILABLE).
    pub fn mark_unready(&self, why: String) {
        self.metrics.ready.set(0);
        self.seen.rcu(|seen| Seen {
            ready: false,
            problem: Some(why.clone()),
            ..seen.as_ref().clone()
        });
        self.changed.send_modify(|n| *n += 1);
    }

    /// Keeps the state fresh for as long as the worker is in the pool: a poll of readiness
    /// and ready models every `refresh`, plus a `grpc.health.v1` Watch that takes the
    /// worker out at once when it says NOT_SERVING (draining) or the stream breaks (it
    /// died), and brings the next poll forward when it says SERVING again.
    pub async fn keep_fresh(self: Arc<Self>, refresh: Duration, timeout: Duration) {
        let poll = async {
            // Say at once why a worker is not usable (a wrong address, a worker that is
            // down), not only when the first request fails.
            self.refresh(timeout).await;
            if let Some(problem) = self.seen().problem {
                tracing::warn!(worker = %self.addr, %problem, retry_every = ?refresh, "worker not ready");
            }
            loop {
                tokio::select! {
                    () = tokio::time::sleep(refresh) => {}
                    () = self.wake.notified() => {}
                }
                self.refresh(timeout).await;
            }
        };
        let watch = async {
            loop {
                self.watch_health().await;
                tokio::time::sleep(refresh).await;
            }
        };
        let follow = async {
            while let follow::Followed::Ended = self.follow().await {
                tokio::time::sleep(refresh).await;
            }
        };
        tokio::join!(poll, watch, follow);
    }

    async fn watch_health(&self) {
        use futures::StreamExt;
        use tonic_health::pb::{
            health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
        };
        let mut health = HealthClient::new(self.channel.clone());
        let Ok(stream) = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        while let Some(Ok(update)) = stream.next().await {
            if update.status() == ServingStatus::Serving {
                self.wake.notify_one();
            } else if self.placing() {
                // Its models stay served here until copies elsewhere take over.
                if self.is_ready() && !self.is_draining() {
                    tracing::info!(worker = %self.addr, "worker health NOT_SERVING; draining its models to other workers");
                    self.store(|seen| Seen {
                        draining: true,
                        ..seen.clone()
                    });
                }
                return;
            } else {
                if self.seen().ready {
                    tracing::info!(worker = %self.addr, "worker health NOT_SERVING; out of rotation");
                    self.mark_unready("health NOT_SERVING (draining or loading)".into());
                }
                // End the watch: an open stream would hold a draining worker until its
                // drain timeout. The poll brings the worker back when it is ready.
                return;
            }
        }
        if self.seen().ready {
            tracing::info!(worker = %self.addr, "health watch ended; out of rotation until it answers again");
            self.mark_unready("connection lost".into());
        }
    }

    /// Asks the worker for its readiness and ready models (the models only while its
    /// change stream is closed).
    pub async fn refresh(&self, timeout: Duration) {
        self.refresh_from(timeout, false).await
    }

    /// `refresh`, asking for the repository index even while the change stream is open
    /// (after a Load or Unload through the gateway, which must show at once).
    pub async fn refresh_index(&self, timeout: Duration) {
        self.refresh_from(timeout, true).await
    }

    async fn refresh_from(&self, timeout: Duration, index_too: bool) {
        let mut client = self.client.clone();
        let streamed = !index_too && self.seen.load().held.is_some();
        let ask = async {
            let ready = client
                .server_ready(ServerReadyRequest {})
                .await?
                .into_inner()
                .ready;
            let index = match streamed {
                true => Vec::new(),
                false => {
                    client
                        .repository_index(RepositoryIndexRequest::default())
                        .await?
                        .into_inner()
                        .models
                }
            };
            Ok::<_, tonic::Status>((ready, index))
        };
        let (seen, answered) = match tokio::time::timeout(timeout, ask).await {
            Ok(Ok((ready, index))) => {
                let mut seen = Seen {
                    ready,
                    problem: (!ready).then(|| "not ready".into()),
                    ..Default::default()
                };
                for m in index {
                    seen.list(&m.name, &m.version, &m.state);
                }
                (seen, true)
            }
            Ok(Err(status)) => {
                let problem = Some(describe(&status));
                (
                    Seen {
                        problem,
                        ..Default::default()
                    },
                    false,
                )
            }
            Err(_) => {
                let problem = Some(format!("no answer within {timeout:?}"));
                (
                    Seen {
                        problem,
                        ..Default::default()
                    },
                    false,
                )
            }
        };
        let before = self.seen.load().ready;
        // Sampled here, not on every call: reading the estimate is the pick path's work.
        self.metrics.load.set((self.load.cost() / 1000.0) as i64);
        self.store(|current| {
            let mut next = seen.clone();
            // A draining worker says it is not ready but still serves: the keeper decides
            // when it leaves. Ready again, it is back in full.
            if current.draining && current.ready && answered && !next.ready {
                next.ready = true;
                next.problem = None;
                next.draining = true;
            }
            if streamed && !Self::models_from_stream(&mut next, current) {
                // The stream closed meanwhile: the models as they were, until the next poll.
                next.models = current.models.clone();
                next.known = current.known.clone();
                next.versions = current.versions.clone();
            } else if !streamed {
                next.held = current.held.clone();
            }
            next
        });
        let after = self.seen();
        if before != after.ready {
            tracing::info!(worker = %self.addr, ready = after.ready, problem = ?after.problem, "worker readiness changed");
        }
    }
}

/// A status with the chain of errors under it ("Unavailable: transport error: tcp connect
/// error: Connection refused"), for logs and `infermesh models`: tonic's message alone
/// says only "transport error".
pub fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    infermesh_core::text::cap_message(text)
}

/// Workers for the route and balance tests: ready, with these ready versions of each
/// model, at 127.0.0.N:9 for N from `first` (discard; the channel is lazy and never
/// connects).
#[cfg(test)]
pub fn fakes(first: usize, n: usize, models: &[(&str, &[i64])]) -> Vec<Arc<Endpoint>> {
    (first..first + n)
        .map(|i| {
            let ep = Endpoint::new(
                format!("127.0.0.{i}:9").as_str(),
                &Default::default(),
                Default::default(),
            )
            .unwrap();
            let versions: BTreeMap<String, BTreeSet<i64>> = models
                .iter()
                .map(|(m, v)| (m.to_string(), v.iter().copied().collect()))
                .collect();
            ep.set_seen(Seen {
                ready: true,
                models: versions.clone(),
                known: versions.keys().cloned().collect(),
                versions,
                problem: None,
                held: None,
                draining: false,
            });
            ep
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ready() -> Seen {
        Seen {
            ready: true,
            models: [("m".to_string(), BTreeSet::from([1]))].into(),
            known: ["m".to_string()].into(),
            versions: [("m".to_string(), BTreeSet::from([1]))].into(),
            problem: None,
            held: None,
            draining: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transport_failures_eject_with_a_doubling_backoff() {
        let ep = Endpoint::new("127.0.0.1:9", &Default::default(), Default::default()).unwrap();
        ep.set_seen(ready());
        let broken = tonic::Status::unknown("transport error");
        let note = |s: &tonic::Status| ep.note_failure("m", crate::failure::classify(s), s);
        note(&broken);
        assert!(!ep.serves("m", None));
        ep.set_seen(ready()); // a poll answering ready during the backoff
        assert!(!ep.serves("m", None), "still ejected");
        tokio::time::advance(Duration::from_millis(1100)).await;
        ep.set_seen(ready());
        assert!(ep.serves("m", None), "back after 1 s and a good poll");

        note(&broken); // second in a row: 2 s
        tokio::time::advance(Duration::from_millis(1500)).await;
        ep.set_seen(ready());
        assert!(!ep.serves("m", None));
        tokio::time::advance(Duration::from_millis(600)).await;
        ep.set_seen(ready());
        assert!(ep.serves("m", None));

        ep.succeeded(); // healthy again: the next ejection is short
        note(&broken);
        tokio::time::advance(Duration::from_millis(1100)).await;
        ep.set_seen(ready());
        assert!(ep.serves("m", None));

        // A draining worker's refusal is not an outlier: out until the next good poll.
        note(&infermesh_core::reason::status(
            tonic::Code::Unavailable,
            "reworded",
            infermesh_core::Reason::Draining,
        ));
        assert!(!ep.serves("m", None));
        ep.set_seen(ready());
        assert!(ep.serves("m", None));
    }
}
