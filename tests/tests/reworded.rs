//! The gateway decides from codes and reasons, never from words: behind proxies that
//! rewrite every failure message of their workers, routing, retries and ejection are
//! what they are behind the workers themselves.

use infermesh_core::{reason, Reason};
use infermesh_proto::{ModelInferRequest, ModelStatisticsRequest};
use infermesh_tests::{metric_at, repo::*, reword::Reworder, tensors::*, Gateway, Worker};
use tonic::Code;

fn echo(model: &str) -> ModelInferRequest {
    request(model, vec![raw("INPUT0", "FP32", &[4], f32s(&[1.0; 4]))])
}

async fn executions(w: &Worker, model: &str) -> u64 {
    let req = ModelStatisticsRequest {
        name: model.into(),
        version: String::new(),
    };
    let stats = w.client().await.model_statistics(req).await.unwrap();
    stats.into_inner().model_stats[0].execution_count
}

#[tokio::test]
async fn reworded_failures_route_retry_and_eject_the_same() {
    let both = Repo::new()
        .identity("echo", &identity_config("", "[ 4 ]"))
        .identity("special", &identity_config("", "[ 4 ]"));
    let echo_only = Repo::new().identity("echo", &identity_config("", "[ 4 ]"));
    let flags = ["--model-control-mode", "explicit", "--load-model", "*"];
    let a = Worker::start(both.path(), &flags).await;
    // B's queue holds nothing: every request it gets is answered queue-full.
    let b = Worker::start(
        echo_only.path(),
        &[&flags[..], &["--max-queue-size", "0"]].concat(),
    )
    .await;
    let (pa, pb) = (Reworder::start(&a).await, Reworder::start(&b).await);
    let gw = Gateway::start_at(&[pa.addr, pb.addr], &[]).await;
    let mut client = gw.client().await;

    // The proxy really rewrites: a worker's own failure comes through in other words,
    // with its code and reason.
    let err = client.model_infer(echo("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason::of_status(&err), Some(Reason::ModelNotFound));
    let direct = own_error_through_a_proxy(&b).await;
    assert_eq!(
        direct.message(),
        infermesh_tests::reword::WORDS,
        "{direct:?}"
    );

    // Routing: "special" only where it is; busy B's queue-full answers are retried on A
    // and cost no client an error.
    for _ in 0..30 {
        client.model_infer(echo("special")).await.unwrap();
        client.model_infer(echo("echo")).await.unwrap();
    }
    assert_eq!(executions(&a, "special").await, 30);
    assert_eq!(executions(&a, "echo").await, 30, "every echo ran on A");

    // A busy worker is not ejected, whatever its words.
    let ejected = format!(
        "infermesh_gateway_worker_ejections_total{{worker=\"{}\"}}",
        pb.addr
    );
    assert_eq!(
        metric_at(gw.metrics_addr, &ejected).await.unwrap_or(0.0),
        0.0
    );
    let ready = format!("infermesh_gateway_worker_ready{{worker=\"{}\"}}", pb.addr);
    assert_eq!(metric_at(gw.metrics_addr, &ready).await, Some(1.0));

    // Retries on model-not-ready: unloading "echo" on A moves it to B (now with room),
    // with no client error and A still in rotation for "special".
    a.unload("echo").await;
    let b2 = Worker::start(echo_only.path(), &flags).await;
    let pb2 = Reworder::start(&b2).await;
    let gw2 = Gateway::start_at(&[pa.addr, pb2.addr], &[]).await;
    let mut client2 = gw2.client().await;
    for _ in 0..20 {
        client2.model_infer(echo("echo")).await.unwrap();
        client2.model_infer(echo("special")).await.unwrap();
    }
    assert_eq!(executions(&b2, "echo").await, 20);
    let ready_a = format!("infermesh_gateway_worker_ready{{worker=\"{}\"}}", pa.addr);
    assert_eq!(metric_at(gw2.metrics_addr, &ready_a).await, Some(1.0));

    gw2.stop().await.unwrap();
    gw.stop().await.unwrap();
    for p in [pa, pb, pb2] {
        p.stop().await;
    }
    for w in [a, b, b2] {
        w.stop().await.unwrap();
    }
}

/// B's own answer to a request, through its proxy.
async fn own_error_through_a_proxy(b: &Worker) -> tonic::Status {
    let proxy = Reworder::start(b).await;
    let mut c = infermesh_tests::client(&format!("http://{}", proxy.addr)).await;
    let err = c.model_infer(echo("echo")).await.unwrap_err();
    proxy.stop().await;
    err
}
