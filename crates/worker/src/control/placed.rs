//! RepositoryModelLoad in placement mode: a READY model unchanged on disk is only marked
//! used; anything else loads once however many ask (later asks wait for the first), on
//! the gate's request turn, after evicting least recently used idle models to make room;
//! a load that cannot get room is refused with its reason, never attempted.

use std::{collections::BTreeMap, sync::Arc};

use infermesh_core::{model_control::check_name, Error as RequestError, Reason};

use super::{stamp, Control};
use crate::{
    placement::{gate::Priority, NoRoom, Resident},
    repository::Found,
    Error,
};

impl Control {
    pub(super) async fn place(self: &Arc<Self>, name: &str) -> Result<(), Error> {
        check_name(name)?;
        let found = self.repo.scan_one(name).ok_or_else(|| {
            RequestError::NotFound(format!(
                "model_name '{name}': no such model directory in the model repository"
            ))
        })?;
        if self.is_current(name).await {
            for m in self.repo.ready_models().iter().filter(|m| m.name == name) {
                m.usage.touch();
            }
            return Ok(());
        }
        let placement = self.placement.clone().expect("placement mode");
        let this = self.clone();
        let (load, _joined) = placement.load_once(name, move || {
            // Its own task: the load finishes (and is forgotten) even if every asker
            // goes away.
            let task = tokio::spawn(async move {
                let name = found.name.clone();
                let result = this.place_now(found).await;
                if let Some(p) = &this.placement {
                    p.load_done(&name);
                }
                result
            });
            Box::pin(async move {
                task.await
                    .unwrap_or_else(|e| Err(Error::Load(format!("loader panicked: {e}"))))
            })
        });
        load.await
    }

    /// Whether `name` is READY as its files are now.
    async fn is_current(&self, name: &str) -> bool {
        self.repo.get(name, "").is_ok()
            && self.stamps.lock().await.get(name) == Some(&stamp(&self.repo.root().join(name)))
    }

    async fn place_now(&self, found: Found) -> Result<(), Error> {
        let placement = self.placement.as_ref().expect("placement mode");
        let _turn = self.gate.turn(Priority::Request).await;
        let name = found.name.clone();
        self.under_max_models(&name)?;
        let need: u64 = match &found.plan {
            Ok(plan) => plan
                .versions
                .iter()
                .map(|(v, path)| placement.estimate(&name, *v, path).bytes)
                .sum(),
            // Fails as the load would: reported on the model's entry.
            Err(_) => 0,
        };
        let victims = match placement.victims(need, &name, &self.resident()) {
            Ok(v) => v,
            Err(no) => {
                let (reason, why) = match no {
                    NoRoom::OverCapacity(why) => (Reason::OverCapacity, why),
                    NoRoom::ChurnGuard(why) => (Reason::ChurnGuard, why),
                };
                placement.metrics.refused(reason.as_str());
                tracing::warn!(model = %name, %reason, %why, "model load refused");
                return Err(RequestError::ResourceExhausted(format!(
                    "model_name '{name}': not loaded ({reason}): {why}"
                ))
                .because(reason)
                .into());
            }
        };
        for victim in victims {
            self.evict(&victim).await;
        }
        let result = self.reload_in_turn(found).await;
        self.trim(&name).await;
        self.publish_use();
        result
    }

    /// After a load that took more than estimated: evict what may go until the loaded
    /// models fit again, `name` (just loaded) kept.
    async fn trim(&self, name: &str) {
        let placement = self.placement.as_ref().expect("placement mode");
        let resident = self.resident();
        let took = resident
            .iter()
            .find(|r| r.name == name)
            .map_or(0, |r| r.bytes);
        match placement.victims(took, name, &resident) {
            Ok(victims) => {
                for victim in victims {
                    self.evict(&victim).await;
                }
            }
            Err(NoRoom::OverCapacity(why) | NoRoom::ChurnGuard(why)) => {
                tracing::warn!(model = %name, %why, "a load took more than estimated; over the capacity until models can go");
            }
        }
    }

    /// The loaded models, all versions of each together.
    fn resident(&self) -> Vec<Resident> {
        let placement = self.placement.as_ref().expect("placement mode");
        let mut by_name: BTreeMap<String, Resident> = BTreeMap::new();
        for m in self.repo.ready_models() {
            let bytes = placement.size(&m.name, m.version).map_or(0, |s| s.bytes);
            let r = by_name.entry(m.name.clone()).or_insert_with(|| Resident {
                name: m.name.clone(),
                bytes: 0,
                in_flight: 0,
                idle: m.usage.idle(),
                age: m.usage.age(),
            });
            r.bytes += bytes;
            // An open sequence's state lives in the loaded model: it is not evicted under
            // it (an idle sequence is released after max_sequence_idle_microseconds).
            r.in_flight += m.usage.in_flight() + m.sequences.as_ref().map_or(0, |s| s.open());
            r.idle = r.idle.min(m.usage.idle());
            r.age = r.age.min(m.usage.age());
        }
        by_name.into_values().collect()
    }

    async fn evict(&self, name: &str) {
        let placement = self.placement.as_ref().expect("placement mode");
        let times = self
            .resident()
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| (r.idle, r.age));
        let engines: Vec<_> = self
            .repo
            .ready_models()
            .iter()
            .filter(|m| m.name == name)
            .map(|m| m.alive.clone())
            .collect();
        {
            let mut stamps = self.stamps.lock().await;
            self.unload_all(name).await;
            stamps.remove(name);
        }
        // Its memory is back before the next load is measured (nothing was in flight:
        // its instances end as soon as the model is dropped).
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while engines.iter().any(|e| e.strong_count() > 0) && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        crate::placement::memory::trim();
        placement.metrics.evictions.inc();
        if let Some((idle, age)) = times {
            placement.metrics.eviction_idle.observe(idle.as_secs_f64());
            placement.metrics.eviction_age.observe(age.as_secs_f64());
        }
        tracing::info!(model = %name, ?times, "model evicted to make room (idle, age)");
        self.publish_use();
    }

    fn publish_use(&self) {
        if let Some(p) = &self.placement {
            let used = p.used(&self.repo.ready_models());
            p.metrics.used_bytes.set(used as i64);
        }
    }
}
