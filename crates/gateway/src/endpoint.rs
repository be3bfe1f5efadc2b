//! One worker as the gateway sees it: a lazily connected HTTP/2 channel, its load
//! estimate, and its readiness and ready (model, version) set, refreshed in the background.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient, RepositoryIndexRequest,
    ServerReadyRequest,
};
use tonic::transport::Channel;

use crate::load::Load;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// What the gateway last learned from the worker.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub ready: bool,
    /// Ready versions per model.
    pub models: BTreeMap<String, BTreeSet<i64>>,
    /// Every model the worker lists, ready or not (tells NOT_FOUND from UNAVAILABLE).
    pub known: BTreeSet<String>,
    /// Why it is not ready, for error messages.
    pub problem: Option<String>,
}

pub struct Endpoint {
    pub addr: String,
    pub client: Client,
    pub load: Load,
    channel: Channel,
    seen: RwLock<Seen>,
    /// Wakes the refresher early (the health watch saw the worker come back).
    wake: tokio::sync::Notify,
}

impl Endpoint {
    pub fn new(addr: &str, connect_timeout: Duration) -> Result<Arc<Self>, String> {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| format!("bad worker address '{addr}': {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        let client = GrpcInferenceServiceClient::new(channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Ok(Arc::new(Self {
            addr: addr.to_string(),
            client,
            load: Load::default(),
            channel,
            seen: RwLock::default(),
            wake: tokio::sync::Notify::new(),
        }))
    }

    pub fn seen(&self) -> Seen {
        self.seen.read().expect("endpoint lock").clone()
    }

    /// Whether it is ready and serves `model` at `version` (None: any version).
    pub fn serves(&self, model: &str, version: Option<i64>) -> bool {
        let seen = self.seen.read().expect("endpoint lock");
        seen.ready
            && seen
                .models
                .get(model)
                .is_some_and(|v| version.is_none_or(|want| v.contains(&want)))
    }

    /// The newest ready version of `model` here.
    pub fn newest(&self, model: &str) -> Option<i64> {
        let seen = self.seen.read().expect("endpoint lock");
        if !seen.ready {
            return None;
        }
        seen.models.get(model).and_then(|v| v.last().copied())
    }

    pub fn knows(&self, model: &str) -> bool {
        self.seen
            .read()
            .expect("endpoint lock")
            .known
            .contains(model)
    }

    /// Learns from a failed call: a model-level answer takes the model off this worker
    /// until the next refresh; anything else (transport, draining) the whole worker.
    pub fn note_failure(&self, model: &str, status: &tonic::Status) {
        let msg = status.message();
        let model_level = status.code() == tonic::Code::NotFound
            || (status.code() == tonic::Code::Unavailable
                && msg.contains(&format!("model '{model}'")));
        if status.code() == tonic::Code::ResourceExhausted {
            return; // busy, not broken: the load estimate already steers away
        }
        if model_level {
            self.seen
                .write()
                .expect("endpoint lock")
                .models
                .remove(model);
        } else {
            self.mark_unready(format!("{}: {msg}", status.code()));
        }
    }

    /// Sets what the worker is known to serve (tests; discovery of state without a worker).
    pub fn set_seen(&self, seen: Seen) {
        *self.seen.write().expect("endpoint lock") = seen;
    }

    /// Marks the worker out of rotation at once (e.g. it answered UNAVAILABLE).
    pub fn mark_unready(&self, why: String) {
        let mut seen = self.seen.write().expect("endpoint lock");
        seen.ready = false;
        seen.problem = Some(why);
    }

    /// Keeps the state fresh for as long as the worker is in the pool: a poll of readiness
    /// and ready models every `refresh`, plus a `grpc.health.v1` Watch that takes the
    /// worker out at once when it says NOT_SERVING (draining) or the stream breaks (it
    /// died), and brings the next poll forward when it says SERVING again.
    pub async fn keep_fresh(self: Arc<Self>, refresh: Duration, timeout: Duration) {
        let poll = async {
            loop {
                self.refresh(timeout).await;
                tokio::select! {
                    () = tokio::time::sleep(refresh) => {}
                    () = self.wake.notified() => {}
                }
            }
        };
        let watch = async {
            loop {
                self.watch_health().await;
                tokio::time::sleep(refresh).await;
            }
        };
        tokio::join!(poll, watch);
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

    /// Asks the worker for its readiness and ready models.
    pub async fn refresh(&self, timeout: Duration) {
        let mut client = self.client.clone();
        let ask = async {
            let ready = client
                .server_ready(ServerReadyRequest {})
                .await?
                .into_inner()
                .ready;
            let index = client
                .repository_index(RepositoryIndexRequest::default())
                .await?
                .into_inner()
                .models;
            Ok::<_, tonic::Status>((ready, index))
        };
        let seen = match tokio::time::timeout(timeout, ask).await {
            Ok(Ok((ready, index))) => {
                let mut seen = Seen {
                    ready,
                    problem: (!ready).then(|| "not ready".into()),
                    ..Default::default()
                };
                for m in index {
                    seen.known.insert(m.name.clone());
                    if m.state == "READY" {
                        if let Ok(v) = m.version.parse::<i64>() {
                            seen.models.entry(m.name).or_default().insert(v);
                        }
                    }
                }
                seen
            }
            Ok(Err(status)) => Seen {
                problem: Some(format!("{}: {}", status.code(), status.message())),
                ..Default::default()
            },
            Err(_) => Seen {
                problem: Some(format!("no answer within {timeout:?}")),
                ..Default::default()
            },
        };
        let before = self.seen.read().expect("endpoint lock").ready;
        if before != seen.ready {
            tracing::info!(worker = %self.addr, ready = seen.ready, problem = ?seen.problem, "worker readiness changed");
        }
        *self.seen.write().expect("endpoint lock") = seen;
    }
}
