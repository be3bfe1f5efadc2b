//! How the gateway's RepositoryIndex (and so `infermesh models`) describes placed models:
//! each ready version's copies, where, their measured size, last use and pins; a model
//! with no copy as loading on request; a placement-mode worker's memory on its line.

use std::sync::Arc;

use crate::endpoint::Endpoint;

/// What the index row of a placed model version says, or None when it is not placed
/// (no placement-mode worker lists it). `Some("")` drops the row: the model's own entry
/// ("" version, not loaded) beside a version that has copies.
pub fn row(workers: &[Arc<Endpoint>], name: &str, version: &str, now_ms: i64) -> Option<String> {
    let placing: Vec<(&Arc<Endpoint>, Arc<crate::endpoint::Held>)> = workers
        .iter()
        .filter_map(|e| e.held().filter(|h| h.placing()).map(|h| (e, h)))
        .filter(|(_, h)| h.models.contains_key(name))
        .collect();
    if placing.is_empty() {
        return None;
    }
    let mut copies = Vec::new();
    let mut size = 0u64;
    for (ep, held) in &placing {
        for v in held.models.get(name).into_iter().flatten() {
            size = size.max(v.memory_bytes);
            let ready = v.state == "READY" && ep.is_ready();
            if ready && (version.is_empty() || v.version == version) {
                let ago = (now_ms - v.last_use_unix_ms).max(0) as f64 / 1000.0;
                let pinned = if v.pinned { ", pinned" } else { "" };
                copies.push(format!(
                    "{} ({}, used {ago:.0}s ago{pinned})",
                    ep.addr,
                    mib(v.memory_bytes)
                ));
            }
        }
    }
    Some(match (version.is_empty(), copies.is_empty()) {
        (true, false) => String::new(),
        (_, true) => format!("not loaded: loads on request (about {})", mib(size)),
        (false, false) => format!("copies {}: {}", copies.len(), copies.join(", ")),
    })
}

/// A placement-mode worker's memory, for its line in the index: "" for other workers.
pub fn memory(ep: &Endpoint) -> String {
    match ep.held().filter(|h| h.placing()) {
        Some(h) => format!(", models {} of {} used", mib(h.used), mib(h.capacity)),
        None => String::new(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}
