//! What the process holds and what it may hold: resident memory from /proc, the memory
//! limit from the cgroup (v2, then v1) or the host.

use infermesh_core::process_metrics::kb_field;

/// This process's resident set (VmRSS) in bytes; 0 where /proc cannot say.
pub fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| kb_field(&s, "VmRSS:"))
        .unwrap_or(0)
}

/// Hands the allocator's free pages back to the system, so the resident set is what the
/// process uses: what a load frees as it finishes (parse buffers) does not count as the
/// model's, and what an evicted model gave back is not there to hide the next load.
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The resident set after a trim: where a load's growth is measured from.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    rss: u64,
}

impl Held {
    pub fn now() -> Self {
        trim();
        Self { rss: rss() }
    }

    /// What the process took on since `self`, trimmed again.
    pub fn grown_since(self) -> u64 {
        Self::now().rss.saturating_sub(self.rss)
    }
}

/// The memory this process may use: its cgroup's limit, else the host's memory.
pub fn limit() -> Option<u64> {
    cgroup_limit().or_else(host_memory)
}

fn cgroup_limit() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    // v1 writes "no limit" as a number near 2^63.
    .find(|&n| n > 0 && n < (1 << 60))
}

fn host_memory() -> Option<u64> {
    kb_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")
}

/// Bytes of a version directory's files: the first estimate of what loading it takes.
pub fn files_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_has_a_resident_set_and_a_limit() {
        let before = super::rss();
        assert!(before > 0);
        let since = super::Held::now();
        let held = vec![1u8; 64 << 20];
        let after = super::rss();
        assert!(after >= before + (56 << 20), "{before} -> {after}");
        // Other tests run beside this one: a few MiB either way.
        assert!(since.grown_since() >= 56 << 20, "{}", since.grown_since());
        drop(held);
        // Given back, then taken again in small pieces: still counted.
        let since = super::Held::now();
        let again: Vec<Vec<u8>> = (0..64).map(|_| vec![2u8; 1 << 20]).collect();
        assert!(since.grown_since() >= 56 << 20, "{}", since.grown_since());
        drop(again);
        assert!(super::limit().is_some_and(|l| l > 0));
    }
}
