//! Model instances: each owns one engine on its own OS thread and takes jobs from the
//! model's shared bounded queue, so inference never runs on the async runtime.

use std::thread;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use infermesh_core::{Error as RequestError, Tensor, TensorData};
use tokio::sync::oneshot;

use crate::{
    engine::{Engine, GraphSpec, Provider},
    Error,
};

/// One request for an instance. The reply channel doubles as the cancellation signal: a
/// job whose caller went away is skipped before it reaches the engine.
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<String>,
    pub reply: oneshot::Sender<Result<Vec<Tensor>, Error>>,
}

/// The sending side of a model's queue. Dropping every `Queue` stops the instance threads.
#[derive(Clone)]
pub struct Queue {
    tx: Sender<Job>,
}

impl Queue {
    pub fn bounded(capacity: usize) -> (Self, Receiver<Job>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (Self { tx }, rx)
    }

    /// Enqueues without waiting: a full queue answers RESOURCE_EXHAUSTED at once.
    pub async fn submit(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
        outputs: Vec<String>,
    ) -> Result<Vec<Tensor>, Error> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { inputs, outputs, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(RequestError::ResourceExhausted(format!(
                    "model '{model}': request queue is full ({} waiting); retry later or on another worker",
                    self.tx.len()
                ))
                .into())
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(RequestError::Unavailable(format!("model '{model}' is being unloaded")).into())
            }
        }
        rx.await.map_err(|_| {
            Error::Runtime(format!(
                "model '{model}': instance stopped while running the request"
            ))
        })?
    }
}

/// Starts one instance thread. `load` runs on that thread (engines are built where they
/// live); the result of load + warm-up comes back before the thread takes jobs.
pub fn spawn<E, F>(
    label: String,
    load: F,
    jobs: Receiver<Job>,
) -> Result<(GraphSpec, Provider), Error>
where
    E: Engine,
    F: FnOnce() -> Result<(E, GraphSpec), Error> + Send + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name(label.clone())
        .spawn(move || {
            let mut engine = match load().and_then(|(mut engine, spec)| {
                warm_up(&mut engine, &spec)?;
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
            for job in jobs {
                if job.reply.is_closed() {
                    tracing::debug!(instance = %label, "skipping a request whose caller went away");
                    continue;
                }
                let result = engine.run(&job.inputs, &job.outputs);
                let _ = job.reply.send(result);
            }
        })
        .map_err(|e| Error::Load(format!("cannot start instance thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| Error::Load("instance thread died while loading".into()))?
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
