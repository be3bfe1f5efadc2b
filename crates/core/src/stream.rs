//! ModelStreamInfer, shared by worker and gateway: every message is handled as soon as it
//! arrives (several in flight at once, so they can share batches or spread over workers);
//! responses go back in request order unless a message sets `infermesh_unordered: true`,
//! which lets it be answered as soon as it is done. A bad message is answered with
//! `error_message` (its id, and its status code in `infermesh_status_code`) while the
//! stream goes on. When the client goes away, the
//! work in flight is dropped, which cancels it downstream.

use std::{future::Future, pin::Pin};

use futures::{
    future::BoxFuture,
    stream::{FuturesOrdered, FuturesUnordered},
    Stream, StreamExt,
};
use infermesh_proto as pb;
use pb::infer_parameter::ParameterChoice;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::status_map::map_status;

/// Response parameter of a failed stream message: its gRPC status code, as a number.
pub const STATUS_CODE: &str = "infermesh_status_code";

/// Request parameter: answer this message as soon as it is done, not in request order.
pub const UNORDERED: &str = "infermesh_unordered";

pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

/// Serves one stream. `handle` answers one message; at most `max_in_flight` run at once,
/// beyond which the stream stops reading (back-pressure through HTTP/2 flow control).
pub fn serve<F, Fut>(
    mut inbound: Streaming<pb::ModelInferRequest>,
    max_in_flight: usize,
    handle: F,
) -> ResponseStream
where
    F: Fn(pb::ModelInferRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<pb::ModelInferResponse, Status>> + Send + 'static,
{
    let max_in_flight = max_in_flight.max(1);
    let (tx, rx) = mpsc::channel(max_in_flight);
    tokio::spawn(async move {
        type Answer = BoxFuture<'static, pb::ModelStreamInferResponse>;
        let mut ordered: FuturesOrdered<Answer> = FuturesOrdered::new();
        let mut unordered: FuturesUnordered<Answer> = FuturesUnordered::new();
        let mut reading = true;
        let mut broken: Option<Status> = None;
        loop {
            let in_flight = ordered.len() + unordered.len();
            if !reading && in_flight == 0 {
                break;
            }
            let out = tokio::select! {
                msg = inbound.message(), if reading && in_flight < max_in_flight => match msg {
                    Ok(Some(req)) => {
                        let unordered_opt = wants_unordered(&req);
                        let (id, model_name, model_version) =
                            (req.id.clone(), req.model_name.clone(), req.model_version.clone());
                        let fut = handle(req);
                        let answer: Answer = Box::pin(async move {
                            match fut.await {
                                Ok(resp) => pb::ModelStreamInferResponse { error_message: String::new(), infer_response: Some(resp) },
                                Err(status) => pb::ModelStreamInferResponse {
                                    error_message: status.message().to_string(),
                                    // The id tells the client which request failed, and
                                    // the parameter its status code (the message is text).
                                    infer_response: Some(pb::ModelInferResponse {
                                        model_name, model_version, id,
                                        parameters: [(STATUS_CODE.to_string(), pb::InferParameter {
                                            parameter_choice: Some(ParameterChoice::Int64Param(status.code() as i64)),
                                        })].into(),
                                        ..Default::default()
                                    }),
                                },
                            }
                        });
                        if unordered_opt { unordered.push(answer) } else { ordered.push_back(answer) }
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
            .get(UNORDERED)
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(pb::infer_parameter::ParameterChoice::BoolParam(true))
    )
}
