//! The identity backend: output i echoes input i. Optional `delay_ms`, `failure_rate` and
//! `stall_rate` with `stall_ms` parameters in config.pbtxt make slow, failing or
//! sometimes-stalling workers for tests and benchmarks, and it measures the
//! mesh without model cost. `crash_on_first_byte: "N"` aborts the whole process when an
//! input's first byte is N: a stand-in for a query of death, to test that the gateway
//! contains one (nothing real crashes a worker any more); `panic_on_first_byte: "N"`
//! panics instead, to test that a panic fails only its own request.

use std::time::Duration;

use infermesh_core::Tensor;
use infermesh_proto as pb;

use super::{Engine, Provider};
use crate::Error;

pub struct IdentityEngine {
    /// (output name, input name) pairs.
    pairs: Vec<(String, String)>,
    delay: Duration,
    failure_rate: f64,
    /// A share of executions that take `stall` instead of `delay` (a worker's tail: a
    /// pause, a noisy neighbour), deterministic as `failure_rate` is.
    stall_rate: f64,
    stall: Duration,
    stalls: u64,
    /// Held through a stall by the instance that stalls; shared by the model's instances.
    pause: std::sync::Arc<std::sync::Mutex<()>>,
    runs: u64,
    failures: u64,
    crash_on: Option<u8>,
    panic_on: Option<u8>,
}

impl IdentityEngine {
    pub fn new(config: &pb::ModelConfig) -> Result<Self, Error> {
        let param = |key: &str| config.parameters.get(key).map(|p| p.string_value.as_str());
        let number = |key: &str| -> Result<Option<f64>, Error> {
            param(key)
                .map(|v| {
                    v.trim().parse::<f64>().map_err(|_| {
                        Error::Load(format!("parameters '{key}': '{v}' is not a number"))
                    })
                })
                .transpose()
        };
        let delay_ms = number("delay_ms")?.unwrap_or(0.0);
        let failure_rate = number("failure_rate")?.unwrap_or(0.0);
        let stall_rate = number("stall_rate")?.unwrap_or(0.0);
        let stall_ms = number("stall_ms")?.unwrap_or(0.0);
        let byte = |key: &str| {
            param(key)
                .map(|v| {
                    v.trim().parse::<u8>().map_err(|_| {
                        Error::Load(format!(
                            "parameters '{key}': '{v}' is not a byte value (0..=255)"
                        ))
                    })
                })
                .transpose()
        };
        let crash_on = byte("crash_on_first_byte")?;
        let panic_on = byte("panic_on_first_byte")?;
        if !(0.0..=1.0).contains(&failure_rate)
            || !(0.0..=1.0).contains(&stall_rate)
            || delay_ms < 0.0
            || stall_ms < 0.0
        {
            return Err(Error::Load(
                "parameters: failure_rate and stall_rate must be within 0..1, delay_ms and stall_ms not negative".into(),
            ));
        }
        Ok(Self {
            pairs: config
                .output
                .iter()
                .zip(&config.input)
                .map(|(o, i)| (o.name.clone(), i.name.clone()))
                .collect(),
            delay: Duration::from_secs_f64(delay_ms / 1000.0),
            failure_rate,
            stall_rate,
            stall: Duration::from_secs_f64(stall_ms / 1000.0),
            stalls: 0,
            pause: pause(config),
            runs: 0,
            failures: 0,
            crash_on,
            panic_on,
        })
    }
}

/// The pause lock of a model (by name): every instance of it shares one.
fn pause(config: &pb::ModelConfig) -> std::sync::Arc<std::sync::Mutex<()>> {
    type Locks =
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<std::sync::Mutex<()>>>>;
    static LOCKS: std::sync::OnceLock<Locks> = std::sync::OnceLock::new();
    let locks = LOCKS.get_or_init(Default::default);
    let mut locks = locks.lock().unwrap_or_else(|e| e.into_inner());
    locks.entry(config.name.clone()).or_default().clone()
}

impl Engine for IdentityEngine {
    fn run(&mut self, inputs: &[Tensor], outputs: &[String]) -> Result<Vec<Tensor>, Error> {
        let first_byte_is = |b: u8| inputs.iter().any(|t| t.to_raw().first() == Some(&b));
        if self.crash_on.is_some_and(first_byte_is) {
            eprintln!("identity backend: crash_on_first_byte matched; aborting");
            std::process::abort();
        }
        if self.panic_on.is_some_and(first_byte_is) {
            panic!("identity backend: panic_on_first_byte matched");
        }
        self.runs += 1;
        // Deterministic: after n runs exactly floor(n × rate) have stalled. A stall pauses
        // every instance of the model, as a process-wide pause would: the others wait on
        // the lock it holds.
        if (self.runs as f64 * self.stall_rate).floor() as u64 > self.stalls {
            self.stalls += 1;
            let _paused = self.pause.lock().unwrap_or_else(|e| e.into_inner());
            std::thread::sleep(self.stall);
        } else {
            drop(self.pause.lock().unwrap_or_else(|e| e.into_inner()));
            std::thread::sleep(self.delay);
        }
        // Deterministic: after n runs exactly floor(n × rate) have failed.
        if (self.runs as f64 * self.failure_rate).floor() as u64 > self.failures {
            self.failures += 1;
            return Err(Error::Runtime(format!(
                "identity backend: injected failure (failure_rate {})",
                self.failure_rate
            )));
        }
        outputs
            .iter()
            .map(|name| {
                let input = self
                    .pairs
                    .iter()
                    .find(|(o, _)| o == name)
                    .and_then(|(_, i)| inputs.iter().find(|t| &t.name == i))
                    .ok_or_else(|| {
                        Error::Runtime(format!("identity backend: no input for output '{name}'"))
                    })?;
                Ok(Tensor {
                    name: name.clone(),
                    ..input.clone()
                })
            })
            .collect()
    }

    fn provider(&self) -> Provider {
        Provider::Cpu
    }
}
