//! ModelStreamInfer: every message runs as soon as it arrives (several in flight at once,
//! so they can share batches); responses go back in request order unless a message sets
//! `infermesh_unordered: true`, which lets it be answered as soon as it is done. A bad
//! message is answered with `error_message` and the stream goes on. When the client goes
//! away, the work still in flight is dropped, and queued jobs are skipped.

use std::pin::Pin;

use futures::{
    future::BoxFuture,
    stream::{FuturesOrdered, FuturesUnordered},
    Stream, StreamExt,
};
use infermesh_core::status_map::map_status;
use infermesh_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::WorkerService;

pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

/// Messages of one stream in flight at once; beyond it the stream stops reading, which
/// pushes back on the client through HTTP/2 flow control.
const MAX_IN_FLIGHT: usize = 256;

pub fn serve(svc: WorkerService, mut inbound: Streaming<pb::ModelInferRequest>) -> ResponseStream {
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(async move {
        let mut ordered: FuturesOrdered<BoxFuture<'static, pb::ModelStreamInferResponse>> =
            FuturesOrdered::new();
        let mut unordered: FuturesUnordered<BoxFuture<'static, pb::ModelStreamInferResponse>> =
            FuturesUnordered::new();
        let mut reading = true;
        let mut broken: Option<Status> = None;
        loop {
            let in_flight = ordered.len() + unordered.len();
            if !reading && in_flight == 0 {
                break;
            }
            let out = tokio::select! {
                msg = inbound.message(), if reading && in_flight < MAX_IN_FLIGHT => match msg {
                    Ok(Some(req)) => {
                        let unordered_opt = wants_unordered(&req);
                        let fut = Box::pin(answer(svc.clone(), req));
                        if unordered_opt { unordered.push(fut) } else { ordered.push_back(fut) }
                        continue;
                    }
                    Ok(None) => { reading = false; continue; }
                    Err(status) => {
                        // The transport broke or a message was undecodable (e.g. over the
                        // size limit): stop reading, answer what is in flight, then end the
                        // stream with that status.
                        reading = false;
                        broken = Some(map_status(status));
                        continue;
                    }
                },
                Some(resp) = ordered.next(), if !ordered.is_empty() => resp,
                Some(resp) = unordered.next(), if !unordered.is_empty() => resp,
                () = tx.closed() => return,
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
        if let Some(status) = broken {
            let _ = tx.send(Err(status)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn wants_unordered(req: &pb::ModelInferRequest) -> bool {
    matches!(
        req.parameters
            .get("infermesh_unordered")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(pb::infer_parameter::ParameterChoice::BoolParam(true))
    )
}

async fn answer(svc: WorkerService, req: pb::ModelInferRequest) -> pb::ModelStreamInferResponse {
    let (id, model_name, model_version) = (
        req.id.clone(),
        req.model_name.clone(),
        req.model_version.clone(),
    );
    // A stream's grpc-timeout bounds the stream; each message may carry `timeout`.
    match svc.infer(req, None).await {
        Ok(resp) => pb::ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(resp),
        },
        Err(e) => pb::ModelStreamInferResponse {
            error_message: Status::from(e).message().to_string(),
            // Echo the id so clients can tell which request failed.
            infer_response: Some(pb::ModelInferResponse {
                model_name,
                model_version,
                id,
                ..Default::default()
            }),
        },
    }
}
