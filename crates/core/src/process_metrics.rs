//! Process metrics in the names Prometheus' own clients use (`process_*`), read from
//! /proc at scrape time. Linux only; elsewhere nothing is exported.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// USER_HZ: the kernel reports CPU times in these ticks; 100 on every Linux ABI.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Default)]
pub struct ProcessCollector;

struct Sample {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    threads: i64,
    open_fds: i64,
    start_time_seconds: f64,
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| kb_field(&status, key).map(|b| b as i64);
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(Sample {
        // utime and stime are fields 14 and 15 of stat: 11 and 12 after the name.
        cpu_seconds: (num(11)? + num(12)?) / TICKS_PER_SEC,
        resident_bytes: kb("VmRSS:")?,
        virtual_bytes: kb("VmSize:")?,
        threads: num(17)? as i64,
        open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as i64,
        start_time_seconds: boot + num(19)? / TICKS_PER_SEC,
    })
}

/// A "Key:   N kB" line of a /proc file (status, meminfo) in bytes.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|v| v * 1024)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let panics = ConstCounter::new(crate::panic::count());
        panics.encode(encoder.encode_descriptor(
            "infermesh_panics",
            "Panics caught in this process (each answered INTERNAL to its request only)",
            None,
            panics.metric_type(),
        )?)?;
        let Some(s) = sample() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory",
                s.virtual_bytes,
            ),
            ("process_threads", "OS threads", s.threads),
            ("process_open_fds", "Open file descriptors", s.open_fds),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let start = ConstGauge::new(s.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time since the Unix epoch",
            None,
            start.metric_type(),
        )?)?;
        Ok(())
    }
}
