//! `infermesh_cache_*`: hits and misses per model version, evictions, bytes and entries.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::metrics::ModelLabels;

#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    pub hits: Family<ModelLabels, Counter>,
    pub misses: Family<ModelLabels, Counter>,
    pub evictions: Counter,
    pub too_large: Counter,
    pub used_bytes: Gauge,
    pub limit_bytes: Gauge,
    pub entries: Gauge,
}

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("infermesh_cache");
        r.register(
            "hits",
            "Requests answered from the response cache, by model and version",
            m.hits.clone(),
        );
        r.register(
            "misses",
            "Requests to a cached model that ran the engine, by model and version",
            m.misses.clone(),
        );
        r.register(
            "evictions",
            "Entries evicted (least recently used) to stay within the cache's size",
            m.evictions.clone(),
        );
        r.register(
            "too_large",
            "Answers not stored because one is larger than the whole cache",
            m.too_large.clone(),
        );
        r.register(
            "bytes",
            "Bytes the cache holds (answers, keys and bookkeeping)",
            m.used_bytes.clone(),
        );
        r.register(
            "limit_bytes",
            "The cache's size (--cache-config local,size=BYTES)",
            m.limit_bytes.clone(),
        );
        r.register("entries", "Answers the cache holds", m.entries.clone());
        m
    }
}
