//! The response cache (Triton's `response_cache`, `--cache-config local,size=BYTES`): an
//! answer kept under a key of everything that decides it ([`key`]), bounded by bytes
//! (keys, bookkeeping and answers counted), least recently used evicted first. A hit is
//! confirmed by a second, independent digest, so a collision of the first can never hand
//! one request another's answer; a model's entries go when it is loaded again or
//! unloaded, and its load generation is in every key besides.

pub mod key;
mod metrics;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use bytes::Bytes;

pub use key::Key;
pub use metrics::CacheMetrics;

/// What one entry costs beyond its tensors: the digests, the maps' slots, the names.
const ENTRY_OVERHEAD: usize = 256;

/// One output of a cached answer.
#[derive(Clone, Debug)]
pub struct Output {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub raw: Bytes,
}

/// A cached answer: the outputs, in the order the engine gave them.
#[derive(Debug)]
pub struct Answer {
    pub outputs: Vec<Output>,
}

impl Answer {
    /// The outputs of an engine's answer (their bytes shared, not copied).
    pub fn of(resp: &infermesh_proto::ModelInferResponse) -> Self {
        Self {
            outputs: resp
                .outputs
                .iter()
                .zip(&resp.raw_output_contents)
                .map(|(o, raw)| Output {
                    name: o.name.clone(),
                    datatype: o.datatype.clone(),
                    shape: o.shape.clone(),
                    raw: raw.clone(),
                })
                .collect(),
        }
    }

    /// The answer to the request `id`.
    pub fn response(
        &self,
        model: &str,
        version: i64,
        id: String,
    ) -> infermesh_proto::ModelInferResponse {
        use infermesh_proto::model_infer_response::InferOutputTensor;
        infermesh_proto::ModelInferResponse {
            model_name: model.into(),
            model_version: version.to_string(),
            id,
            parameters: Default::default(),
            outputs: self
                .outputs
                .iter()
                .map(|o| InferOutputTensor {
                    name: o.name.clone(),
                    datatype: o.datatype.clone(),
                    shape: o.shape.clone(),
                    ..Default::default()
                })
                .collect(),
            raw_output_contents: self.outputs.iter().map(|o| o.raw.clone()).collect(),
        }
    }

    fn bytes(&self) -> usize {
        self.outputs
            .iter()
            .map(|o| o.name.len() + o.datatype.len() + o.shape.len() * 8 + o.raw.len() + 64)
            .sum()
    }
}

struct Entry {
    check: [u8; 32],
    model: Arc<str>,
    tick: u64,
    size: usize,
    answer: Arc<Answer>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<[u8; 32], Entry>,
    /// Entries by last use, oldest first.
    order: BTreeMap<u64, [u8; 32]>,
    tick: u64,
    used: usize,
}

impl Lru {
    fn remove(&mut self, id: &[u8; 32]) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.order.remove(&e.tick);
        self.used -= e.size;
        Some(e)
    }
}

/// The worker's one cache, shared by every model whose config turns it on.
pub struct ResponseCache {
    limit: usize,
    lru: Mutex<Lru>,
    pub metrics: CacheMetrics,
}

impl ResponseCache {
    pub fn new(limit: usize, metrics: CacheMetrics) -> Self {
        metrics.limit_bytes.set(limit as i64);
        Self {
            limit,
            lru: Mutex::default(),
            metrics,
        }
    }

    /// The answer stored under `key`, if its confirming digest matches too.
    pub fn get(&self, key: &Key) -> Option<Arc<Answer>> {
        let mut lru = self.lru.lock().expect("cache lock");
        let lru = &mut *lru;
        let e = lru.entries.get_mut(&key.id)?;
        if e.check != key.check {
            return None;
        }
        lru.order.remove(&e.tick);
        lru.tick += 1;
        e.tick = lru.tick;
        lru.order.insert(e.tick, key.id);
        Some(e.answer.clone())
    }

    /// Stores `answer` under `key` for `model`, evicting the least recently used entries
    /// until the cache is within its bound. An answer larger than the whole cache is not
    /// stored.
    pub fn put(&self, key: &Key, model: &str, answer: Answer) {
        let size = ENTRY_OVERHEAD + model.len() + answer.bytes();
        if size > self.limit {
            self.metrics.too_large.inc();
            return;
        }
        let mut lru = self.lru.lock().expect("cache lock");
        lru.remove(&key.id);
        let mut evicted = 0;
        while lru.used + size > self.limit {
            let Some(&oldest) = lru.order.values().next() else {
                break;
            };
            lru.remove(&oldest);
            evicted += 1;
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.order.insert(tick, key.id);
        lru.entries.insert(
            key.id,
            Entry {
                check: key.check,
                model: Arc::from(model),
                tick,
                size,
                answer: Arc::new(answer),
            },
        );
        lru.used += size;
        self.metrics.evictions.inc_by(evicted);
        self.publish(&lru);
    }

    /// Drops every entry of `model` (it was loaded again or unloaded).
    pub fn clear_model(&self, model: &str) {
        let mut lru = self.lru.lock().expect("cache lock");
        let gone: Vec<[u8; 32]> = lru
            .entries
            .iter()
            .filter(|(_, e)| &*e.model == model)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            lru.remove(id);
        }
        self.publish(&lru);
    }

    fn publish(&self, lru: &Lru) {
        self.metrics.used_bytes.set(lru.used as i64);
        self.metrics.entries.set(lru.entries.len() as i64);
    }

    /// Bytes held now (entries and their bookkeeping).
    pub fn used(&self) -> usize {
        self.lru.lock().expect("cache lock").used
    }
}

/// `--cache-config` as Triton takes it: `local,size=BYTES` (repeatable, one setting
/// each). Returns the local cache's size; anything else is refused with its name.
pub fn parse_config(settings: &[String]) -> Result<Option<usize>, String> {
    let mut size = None;
    for s in settings {
        let (cache, setting) = s.split_once(',').ok_or_else(|| {
            format!("--cache-config {s:?}: expected CACHE,KEY=VALUE, e.g. local,size=1048576")
        })?;
        if cache != "local" {
            return Err(format!(
                "--cache-config {s:?}: the cache {cache:?} is not available; only \"local\" is"
            ));
        }
        match setting.split_once('=') {
            Some(("size", v)) => {
                let n = v.trim().parse::<usize>().map_err(|_| {
                    format!("--cache-config {s:?}: size must be a number of bytes, found {v:?}")
                })?;
                size = Some(n);
            }
            _ => {
                return Err(format!(
                    "--cache-config {s:?}: the local cache takes size=BYTES only, found {setting:?}"
                ))
            }
        }
    }
    match size {
        Some(0) => Err("--cache-config local,size=0: a cache needs a size above 0".into()),
        Some(n) => Ok(Some(n)),
        None if settings.is_empty() => Ok(None),
        None => Err("--cache-config: the local cache needs size=BYTES".into()),
    }
}

#[cfg(test)]
mod tests;
