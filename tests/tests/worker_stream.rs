//! ModelStreamInfer: ids echoed, order kept, a bad message answered with error_message
//! (and its status code) while the stream goes on.

use futures::StreamExt;
use infermesh_proto::{infer_parameter::ParameterChoice, InferParameter, ModelInferRequest};
use infermesh_tests::{models, repo::*, tensors::*, Worker};
use tonic::Code;

fn mlp(id: &str, value: f32) -> ModelInferRequest {
    let mut r = request(
        "mlp",
        vec![raw("input", "FP32", &[1, 784], f32s(&vec![value; 784]))],
    );
    r.id = id.into();
    r
}

#[tokio::test]
async fn stream_answers_in_order_with_ids_and_survives_a_bad_message() {
    let worker = Worker::start(&models(), &[]).await;
    let mut client = worker.client().await;

    // The unary answers are the reference for each value.
    let mut expected = Vec::new();
    for i in 0..20 {
        let r = client
            .model_infer(mlp("", i as f32 / 10.0))
            .await
            .unwrap()
            .into_inner();
        expected.push(read_f32(output(&r, "output")));
    }

    let mut msgs = Vec::new();
    for i in 0..20 {
        msgs.push(mlp(&format!("req-{i}"), i as f32 / 10.0));
        if i == 7 {
            let mut bad = mlp("bad-one", 0.0);
            bad.inputs[0].datatype = "INT8".into();
            msgs.push(bad);
        }
    }
    let mut responses = client
        .model_stream_infer(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(item) = responses.next().await {
        let item = item.expect("stream stays up");
        let resp = item
            .infer_response
            .expect("every answer carries a response with the id");
        if resp.id == "bad-one" {
            assert!(
                item.error_message.contains("input 'input'"),
                "{}",
                item.error_message
            );
            assert!(
                item.error_message.contains("expected FP32"),
                "{}",
                item.error_message
            );
            // The status code a unary call would have had, as a number.
            let code = resp.parameters["infermesh_status_code"]
                .parameter_choice
                .clone();
            assert_eq!(
                code,
                Some(ParameterChoice::Int64Param(Code::InvalidArgument as i64))
            );
        } else {
            assert!(item.error_message.is_empty(), "{}", item.error_message);
            let i: usize = resp.id.strip_prefix("req-").unwrap().parse().unwrap();
            assert_eq!(
                read_f32(output(&resp, "output")),
                expected[i],
                "{}",
                resp.id
            );
        }
        seen.push(resp.id);
    }
    let mut want: Vec<String> = (0..20).map(|i| format!("req-{i}")).collect();
    want.insert(8, "bad-one".into());
    assert_eq!(seen, want, "responses come back in request order");
    worker.stop().await.unwrap();
}

fn flagged(mut r: ModelInferRequest, name: &str) -> ModelInferRequest {
    let on = InferParameter {
        parameter_choice: Some(ParameterChoice::BoolParam(true)),
    };
    r.parameters.insert(name.into(), on);
    r
}

fn slow(id: &str) -> ModelInferRequest {
    let mut r = request("slow", vec![raw("INPUT0", "FP32", &[4], f32s(&[1.0; 4]))]);
    r.id = id.into();
    flagged(r, "infermesh_unordered")
}

/// `infermesh_cancel` (what the gateway sends when its caller goes away) cancels the
/// unordered message with that id: answered CANCELLED and never run, the stream goes on.
#[tokio::test]
async fn a_cancel_message_skips_its_queued_request() {
    let config = identity_config(&delay_ms(500), "[ 4 ]");
    let repo = Repo::new().identity("slow", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut responses = client
        .model_stream_infer(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(slow("running")).unwrap();
    worker
        .wait_metric(
            r#"infermesh_instances_busy{model="slow",version="1"}"#,
            |v| v == 1.0,
        )
        .await;
    tx.send(slow("queued")).unwrap();
    worker
        .wait_metric(r#"infermesh_queue_depth{model="slow",version="1"}"#, |v| {
            v >= 1.0
        })
        .await;
    let cancel = ModelInferRequest {
        id: "queued".into(),
        ..Default::default()
    };
    tx.send(flagged(cancel, "infermesh_cancel")).unwrap();
    let first = responses.next().await.unwrap().unwrap();
    let resp = first.infer_response.unwrap();
    assert_eq!(resp.id, "queued", "the cancelled one is answered at once");
    assert!(
        first.error_message.contains("cancelled"),
        "{}",
        first.error_message
    );
    assert_eq!(
        resp.parameters["infermesh_status_code"].parameter_choice,
        Some(ParameterChoice::Int64Param(Code::Cancelled as i64))
    );
    let second = responses.next().await.unwrap().unwrap();
    assert!(second.error_message.is_empty(), "{}", second.error_message);
    assert_eq!(second.infer_response.unwrap().id, "running");
    worker
        .wait_metric(
            r#"infermesh_skipped_requests_total{model="slow",version="1",code="CANCELLED"}"#,
            |v| v == 1.0,
        )
        .await;
    drop(tx);
    assert!(
        responses.next().await.is_none(),
        "no answer to the cancel itself"
    );
    worker.stop().await.unwrap();
}
