//! Model instances: each owns one engine on its own OS thread (inference never runs on
//! the async runtime) and executes the batches the scheduler hands it.

use std::{sync::Arc, thread, time::Instant};

use crossbeam_channel::Receiver;
use infermesh_core::{Tensor, TensorData};

use crate::{
    batch,
    engine::{Engine, GraphSpec, Provider},
    scheduler::{Batch, Pending},
    stats::{BatchTimes, Stats},
    Error,
};

/// Starts one instance thread. `load` runs on that thread (engines are built where they
/// live); load + warm-up finish before this returns and before the thread takes batches.
pub fn spawn<E, F>(
    label: String,
    load: F,
    samples: Arc<Vec<crate::warmup::Sample>>,
    jobs: Receiver<Batch>,
    stats: Arc<Stats>,
    alive: Arc<()>,
) -> Result<(GraphSpec, Provider), Error>
where
    E: Engine,
    F: FnOnce() -> Result<(E, GraphSpec), Error> + Send + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name(label)
        .spawn(move || {
            // Dropped last, after the engine: its model's memory is back once every
            // instance has let go of it.
            let _alive = alive;
            let mut engine = match load().and_then(|(mut engine, spec)| {
                match samples.is_empty() {
                    true => warm_up(&mut engine, &spec)?,
                    false => run_samples(&mut engine, &spec, &samples, &stats)?,
                }
                Ok((engine, spec))
            }) {
                Ok((engine, spec)) => {
                    let _ = ready_tx.send(Ok((spec, engine.provider())));
                    engine
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for Batch {
                items,
                dispatched,
                slot,
            } in jobs
            {
                stats.metrics.instances_busy.inc();
                execute(&mut engine, items, dispatched, &stats);
                stats.metrics.instances_busy.dec();
                drop(slot); // the instance is idle again
            }
        })
        .map_err(|e| Error::Load(format!("cannot start instance thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| Error::Load("instance thread died while loading".into()))?
}

fn execute<E: Engine>(engine: &mut E, items: Vec<Pending>, dispatched: Instant, stats: &Stats) {
    let (mut live, gone): (Vec<Pending>, Vec<Pending>) =
        items.into_iter().partition(|p| !p.reply.is_closed());
    gone.iter().for_each(|_| stats.skipped_cancelled());
    if live.is_empty() {
        return;
    }
    // One span for the batch: a child of its first traced request, linked to every traced
    // request; none when no request in it is traced.
    let span = match live.iter().find(|p| !p.span.is_disabled()) {
        Some(first) => tracing::info_span!(
            target: infermesh_core::trace::TARGET,
            parent: &first.span,
            "execute",
            batch_size = live.len(),
            rows = live.iter().map(|p| p.rows).sum::<usize>(),
        ),
        None => tracing::Span::none(),
    };
    for p in &mut live {
        p.queue_span = tracing::Span::none();
        infermesh_core::trace::link(&span, &p.span);
    }
    let _in_batch = span.enter();
    // A panic in the engine (or in joining and splitting) fails this batch like an error:
    // the instance thread lives on, and a batch of several runs each request alone, so
    // only the request that caused it fails.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(engine, &live)))
        .unwrap_or_else(|_| {
            Err(Error::Runtime(
                "the engine panicked on this request (logged)".into(),
            ))
        });
    match ran {
        Ok((parts, times)) => {
            let done = Instant::now();
            let rows: usize = live.iter().map(|p| p.rows).sum();
            let per_request: Vec<_> = live
                .iter()
                .map(|p| (dispatched - p.enqueued, done - p.enqueued))
                .collect();
            stats.batch_ok(rows as u64, times, &per_request);
            for (p, outputs) in live.into_iter().zip(parts) {
                let _ = p.reply.send(Ok(pick(outputs, &p.outputs)));
            }
        }
        // One bad request never fails its neighbours: run each alone.
        Err(_) if live.len() > 1 => {
            for p in live {
                execute(engine, vec![p], dispatched, stats);
            }
        }
        Err(e) => {
            for p in live {
                stats.failed(p.enqueued.elapsed());
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Joins, runs and splits one batch; a single request runs on its own tensors (no copy).
fn run<E: Engine>(
    engine: &mut E,
    live: &[Pending],
) -> Result<(Vec<Vec<Tensor>>, BatchTimes), Error> {
    // Every output any request asked for, in the first request's order then the others'.
    let mut wanted: Vec<String> = Vec::new();
    for p in live {
        for o in &p.outputs {
            if !wanted.contains(o) {
                wanted.push(o.clone());
            }
        }
    }
    let t0 = Instant::now();
    let joined;
    let inputs: &[Tensor] = if live.len() == 1 {
        &live[0].inputs
    } else {
        let parts: Vec<&[Tensor]> = live.iter().map(|p| p.inputs.as_slice()).collect();
        joined = batch::concat(&parts);
        &joined
    };
    let t1 = Instant::now();
    let outputs = engine.run(inputs, &wanted)?;
    let t2 = Instant::now();
    let parts = if live.len() == 1 {
        vec![outputs]
    } else {
        let rows: Vec<usize> = live.iter().map(|p| p.rows).collect();
        batch::split(outputs, &rows).map_err(Error::Runtime)?
    };
    let times = BatchTimes {
        input: t1 - t0,
        infer: t2 - t1,
        output: t2.elapsed(),
    };
    Ok((parts, times))
}

/// The outputs a request asked for, in its order.
fn pick(mut outputs: Vec<Tensor>, asked: &[String]) -> Vec<Tensor> {
    if outputs.len() == asked.len() && outputs.iter().zip(asked).all(|(t, a)| &t.name == a) {
        return outputs;
    }
    asked
        .iter()
        .filter_map(|a| {
            outputs
                .iter()
                .position(|t| &t.name == a)
                .map(|i| outputs.swap_remove(i))
        })
        .collect()
}

/// The config's `model_warmup` samples, each `count` times (counted in
/// `infermesh_warmup_runs_total`); one that fails fails the load with its reason.
fn run_samples<E: Engine>(
    engine: &mut E,
    spec: &GraphSpec,
    samples: &[crate::warmup::Sample],
    stats: &Stats,
) -> Result<(), Error> {
    let outputs: Vec<String> = spec.outputs.iter().map(|o| o.name.clone()).collect();
    for sample in samples {
        for _ in 0..sample.count {
            engine
                .run(&sample.inputs, &outputs)
                .map_err(|e| Error::Load(format!("model_warmup '{}' failed: {e}", sample.name)))?;
            stats.metrics.warmup_runs.inc();
        }
    }
    Ok(())
}

/// One run on zeros (batch 1, open dims 1) before the model reports READY, so the first
/// real request does not pay for lazy initialisation.
fn warm_up<E: Engine>(engine: &mut E, spec: &GraphSpec) -> Result<(), Error> {
    let inputs = spec
        .inputs
        .iter()
        .map(|io| {
            let shape: Vec<i64> = io.dims.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
            let count = shape.iter().product::<i64>() as usize;
            let data = match io.datatype.size() {
                Some(size) => TensorData::Fixed(vec![0u8; count * size].into()),
                None => TensorData::Strings(vec![bytes::Bytes::new(); count]),
            };
            Tensor {
                name: io.name.clone(),
                datatype: io.datatype,
                shape,
                data,
            }
        })
        .collect::<Vec<_>>();
    let outputs = spec
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .collect::<Vec<_>>();
    engine
        .run(&inputs, &outputs)
        .map(|_| ())
        .map_err(|e| Error::Load(format!("warm-up run failed: {e}")))
}
