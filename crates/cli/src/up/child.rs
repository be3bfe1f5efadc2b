//! One worker child process of `infermesh up`: started on a port, its bound addresses
//! learned from its JSON log, its last log lines kept so a failure can show them, and the
//! log lines that mean it can never serve reported at once.

use std::{
    collections::VecDeque,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};

/// Log lines kept per worker for error reports.
const TAIL_LINES: usize = 20;

/// What the worker logs when no model can serve: nothing will change by waiting.
const HOPELESS: [&str; 2] = [
    "no model could be loaded",
    "the model repository has no models",
];

pub struct Worker {
    pub child: Child,
    pub addr: String,
    pub metrics: Option<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
    drain: JoinHandle<()>,
}

impl Worker {
    /// Starts `infermesh worker` with `args` on `port`. `fatal` hears the worker say it can
    /// serve nothing (with its last lines).
    pub async fn spawn(
        args: &[String],
        port: &str,
        fatal: mpsc::UnboundedSender<String>,
    ) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut command = Command::new(exe);
        die_with_parent(&mut command);
        let mut child = command
            .args(args)
            .args(["--grpc-port", port])
            // Clients use the gateway's HTTP port; a worker's is on a free one.
            .args(["--http-port", "0"])
            // An error's backtrace would push the error itself out of the kept lines.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let keep = |tail: &Mutex<VecDeque<String>>, line: String| {
            let mut t = tail.lock().expect("tail lock");
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        };
        let listening = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                let v: Value = serde_json::from_str(&line).unwrap_or_default();
                keep(&tail, readable(&line, &v));
                if let Some(a) = v["fields"]["address"].as_str() {
                    let metrics = v["fields"]["metrics"].as_str().filter(|m| *m != "off");
                    return Ok(Some((a.to_string(), metrics.map(str::to_string))));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let (addr, metrics) = match listening {
            Ok(Ok(Some(found))) => found,
            Ok(_) => anyhow::bail!(
                "a worker exited before listening; its last lines:\n{}",
                show(&tail)
            ),
            Err(_) => anyhow::bail!(
                "a worker did not listen within 60 s; its last lines:\n{}",
                show(&tail)
            ),
        };
        let drain = {
            let (tail, addr) = (tail.clone(), addr.clone());
            // Keep reading so the worker never blocks on a full pipe; show its warnings.
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let v: Value = serde_json::from_str(&line).unwrap_or_default();
                    let text = readable(&line, &v);
                    keep(&tail, text.clone());
                    if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
                        eprintln!("worker {addr}: {text}");
                    }
                    let message = v["fields"]["message"].as_str().unwrap_or("");
                    if HOPELESS.iter().any(|h| message.contains(h)) {
                        let _ = fatal.send(format!(
                            "worker {addr} can serve nothing; its last lines:\n{}",
                            show(&tail)
                        ));
                    }
                }
            })
        };
        Ok(Worker {
            child,
            addr,
            metrics,
            tail,
            drain,
        })
    }

    /// Its last log lines, once it has exited (waits briefly for the log to end).
    pub async fn last_lines(&mut self) -> String {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.drain).await;
        show(&self.tail)
    }
}

/// The worker gets SIGTERM (and drains) when `up` dies, however it dies: `kill_on_drop`
/// covers a clean exit only, and a SIGKILLed `up` must not leave workers behind.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

fn show(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().expect("tail lock");
    t.iter().map(|l| format!("  | {l}\n")).collect()
}

/// A JSON log line as `LEVEL message key=value ...`; other lines (an error printed by
/// `main`) as they are.
fn readable(raw: &str, v: &Value) -> String {
    let Some(fields) = v["fields"].as_object() else {
        return raw.to_string();
    };
    let mut text = format!(
        "{} {}",
        v["level"].as_str().unwrap_or(""),
        fields.get("message").and_then(Value::as_str).unwrap_or("")
    );
    for (k, val) in fields.iter().filter(|(k, _)| *k != "message") {
        match val.as_str() {
            Some(s) => text.push_str(&format!(" {k}={s}")),
            None => text.push_str(&format!(" {k}={val}")),
        }
    }
    text
}
