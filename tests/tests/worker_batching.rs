//! Dynamic batching, instances and queue policy on a real worker. Batches are made
//! deterministic with a preferred batch size and a long queue delay; ordering between
//! requests is made deterministic by polling the worker's own metrics.

use std::time::Duration;

use infermesh_proto::{ModelInferRequest, ModelStatisticsRequest};
use infermesh_tests::{repo::*, tensors::*, Client, Worker};
use tonic::Code;

async fn stats(client: &mut Client, model: &str) -> infermesh_proto::ModelStatistics {
    let req = ModelStatisticsRequest {
        name: model.into(),
        version: String::new(),
    };
    client
        .model_statistics(req)
        .await
        .unwrap()
        .into_inner()
        .model_stats
        .remove(0)
}

fn mlp(model: &str, seed: usize) -> ModelInferRequest {
    let v: Vec<f32> = (0..784)
        .map(|i| ((i * 31 + seed * 17) % 100) as f32 / 100.0)
        .collect();
    request(model, vec![raw("input", "FP32", &[1, 784], f32s(&v))])
}

fn ident(model: &str, n: usize) -> ModelInferRequest {
    request(
        model,
        vec![raw("INPUT0", "FP32", &[n as i64], f32s(&vec![1.5; n]))],
    )
}

fn busy(model: &str) -> String {
    format!(r#"infermesh_instances_busy{{model="{model}",version="1"}}"#)
}

fn depth(model: &str) -> String {
    format!(r#"infermesh_queue_depth{{model="{model}",version="1"}}"#)
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_give_one_by_one_outputs() {
    let repo = Repo::new()
        .onnx(
            "mlp_batched",
            "mlp",
            "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 60000000 }",
        )
        .onnx("mlp_single", "mlp", "max_batch_size: 8");
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;

    let mut expected = Vec::new();
    for i in 0..8 {
        let r = client
            .model_infer(mlp("mlp_single", i))
            .await
            .unwrap()
            .into_inner();
        expected.push(output(&r, "output").clone());
    }
    let calls = (0..8).map(|i| {
        let mut c = client.clone();
        tokio::spawn(async move { c.model_infer(mlp("mlp_batched", i)).await })
    });
    let results = futures::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap().unwrap().into_inner();
        assert_eq!(
            output(&r, "output"),
            &expected[i],
            "request {i}: batched output differs"
        );
    }
    let s = stats(&mut client, "mlp_batched").await;
    assert_eq!(s.inference_count, 8);
    assert_eq!(
        s.execution_count, 2,
        "8 requests ran as two batches of the preferred size 4"
    );
    assert_eq!(s.batch_stats.len(), 1);
    assert_eq!(s.batch_stats[0].batch_size, 4);
    assert_eq!(s.batch_stats[0].compute_infer.unwrap().count, 2);
    let infer = s.inference_stats.unwrap();
    assert_eq!(infer.success.unwrap().count, 8);
    let counts = [
        infer.compute_input,
        infer.compute_infer,
        infer.compute_output,
    ]
    .map(|d| d.unwrap().count);
    assert_eq!(
        counts,
        [8, 8, 8],
        "perf_analyzer needs equal compute counts"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn two_instances_run_two_batches_at_once() {
    let config = identity_config(
        r#"parameters { key: "delay_ms" value: { string_value: "3000" } }
instance_group [ { count: 2 kind: KIND_CPU } ]"#,
        "[ 4 ]",
    );
    let repo = Repo::new().identity("slow", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let client = worker.client().await;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.model_infer(ident("slow", 4)).await })
        })
        .collect();
    worker.wait_metric(&busy("slow"), |v| v == 2.0).await;
    for c in calls {
        let r = c.await.unwrap().unwrap().into_inner();
        assert_eq!(read_f32(output(&r, "OUTPUT0")), [1.5; 4]);
    }
    worker.stop().await.unwrap();
}

/// One instance busy, one request queued: the next is refused at once and never runs.
#[tokio::test]
async fn a_full_queue_answers_resource_exhausted() {
    let config = identity_config(
        r#"max_batch_size: 1
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
parameters { key: "delay_ms" value: { string_value: "1000" } }"#,
        "[ 4 ]",
    );
    let repo = Repo::new().identity("q", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let one = || request("q", vec![raw("INPUT0", "FP32", &[1, 4], f32s(&[1.0; 4]))]);
    let mut c = client.clone();
    let r1 = one();
    let first = tokio::spawn(async move { c.model_infer(r1).await });
    worker.wait_metric(&busy("q"), |v| v == 1.0).await;
    let mut c = client.clone();
    let r2 = one();
    let second = tokio::spawn(async move { c.model_infer(r2).await });
    worker.wait_metric(&depth("q"), |v| v == 1.0).await;

    let err = client.model_infer(one()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("queue is full"), "{}", err.message());
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(
        stats(&mut client, "q").await.execution_count,
        2,
        "the refused request never ran"
    );
    worker.stop().await.unwrap();
}

/// Requests whose deadline passes while queued (Triton's `timeout` parameter, or
/// grpc-timeout) are answered DEADLINE_EXCEEDED or dropped, and never run.
#[tokio::test]
async fn expired_requests_never_reach_the_engine() {
    let config = identity_config(&delay_ms(1000), "[ 4 ]");
    let repo = Repo::new().identity("gate", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.model_infer(ident("gate", 4)).await });
    worker.wait_metric(&busy("gate"), |v| v == 1.0).await;

    // Triton's `timeout` parameter, in microseconds: the server answers.
    let mut with_param = ident("gate", 4);
    with_param.parameters.insert(
        "timeout".into(),
        infermesh_proto::InferParameter {
            parameter_choice: Some(
                infermesh_proto::infer_parameter::ParameterChoice::Int64Param(100_000),
            ),
        },
    );
    let err = client.model_infer(with_param).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(err.message().contains("not run"), "{}", err.message());

    // grpc-timeout: the client gives up; the server drops the queued request.
    let mut with_header = tonic::Request::new(ident("gate", 4));
    with_header.set_timeout(Duration::from_millis(100));
    let err = client.model_infer(with_header).await.unwrap_err();
    // tonic's client reports its own timeout as CANCELLED ("Timeout expired").
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err}"
    );

    first.await.unwrap().unwrap();
    let skipped = |code: &str| {
        format!(r#"infermesh_skipped_requests_total{{model="gate",version="1",code="{code}"}}"#)
    };
    let expired = worker
        .metric(&skipped("DEADLINE_EXCEEDED"))
        .await
        .unwrap_or(0.0);
    let dropped = worker
        .wait_metric(&skipped("CANCELLED"), |v| v + expired >= 2.0)
        .await;
    assert_eq!(expired + dropped, 2.0);
    assert_eq!(
        stats(&mut client, "gate").await.execution_count,
        1,
        "only the first request ran"
    );
    worker.stop().await.unwrap();
}

/// A client that cancels while its request is queued: the request is skipped.
#[tokio::test]
async fn cancelled_requests_are_skipped_before_the_engine() {
    let config = identity_config(&delay_ms(1000), "[ 4 ]");
    let repo = Repo::new().identity("gate", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.model_infer(ident("gate", 4)).await });
    worker.wait_metric(&busy("gate"), |v| v == 1.0).await;
    let mut c = client.clone();
    let doomed = tokio::spawn(async move { c.model_infer(ident("gate", 4)).await });
    worker.wait_metric(&depth("gate"), |v| v == 1.0).await;
    doomed.abort();

    first.await.unwrap().unwrap();
    let series = r#"infermesh_skipped_requests_total{model="gate",version="1",code="CANCELLED"}"#;
    worker.wait_metric(series, |v| v == 1.0).await;
    assert_eq!(stats(&mut client, "gate").await.execution_count, 1);
    worker.stop().await.unwrap();
}

/// Beyond --max-inflight-bytes new requests get RESOURCE_EXHAUSTED; room comes back when
/// requests finish.
#[tokio::test]
async fn the_bytes_in_flight_bound_refuses_then_recovers() {
    let config = identity_config(&delay_ms(1000), "[ -1 ]");
    let repo = Repo::new().identity("gate", &config);
    let worker = Worker::start(repo.path(), &["--max-inflight-bytes", "100000"]).await;
    let mut client = worker.client().await;
    let big = || ident("gate", 15_000); // 60 KB
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.model_infer(big()).await });
    worker.wait_metric(&busy("gate"), |v| v == 1.0).await;
    let err = client.model_infer(big()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("--max-inflight-bytes"),
        "{}",
        err.message()
    );
    first.await.unwrap().unwrap();
    client
        .model_infer(big())
        .await
        .expect("room again once the first finished");
    assert_eq!(stats(&mut client, "gate").await.execution_count, 2);
    worker.stop().await.unwrap();
}

/// `--default-queue-timeout`: a request that sets no deadline waits at most that long for
/// an instance, then is answered DEADLINE_EXCEEDED without running; its own deadline wins.
#[tokio::test]
async fn the_default_queue_timeout_bounds_requests_without_a_deadline() {
    let config = identity_config(&delay_ms(1000), "[ 4 ]");
    let repo = Repo::new().identity("gate", &config);
    let worker = Worker::start(repo.path(), &["--default-queue-timeout", "100ms"]).await;
    let mut client = worker.client().await;
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.model_infer(ident("gate", 4)).await });
    worker.wait_metric(&busy("gate"), |v| v == 1.0).await;
    let err = client.model_infer(ident("gate", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(
        first.await.unwrap().is_ok(),
        "the running request is not affected"
    );
}

/// A sub-millisecond max_queue_delay_microseconds means what it says: with 200 µs and
/// batches that cannot fill (one caller), a request waits in the queue at most about
/// 200 µs, not the millisecond tokio's timer would round it up to (and, once the lone
/// caller is recognised, not at all). Read from the worker's own queue statistics
/// (nanoseconds), with a generous bound.
#[tokio::test]
async fn a_sub_millisecond_queue_delay_is_honoured() {
    let config = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 200 }";
    let repo = Repo::new().identity(
        "delayed",
        &format!("backend: \"identity\"\n{config}\ninput [ {{ name: \"INPUT0\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\noutput [ {{ name: \"OUTPUT0\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n"),
    );
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let n = 100;
    for _ in 0..n {
        client
            .model_infer(request(
                "delayed",
                vec![raw("INPUT0", "FP32", &[1, 4], f32s(&[1.0; 4]))],
            ))
            .await
            .unwrap();
    }
    let s = stats(&mut client, "delayed").await;
    let queue = s.inference_stats.unwrap().queue.unwrap();
    assert_eq!(queue.count, n);
    let mean_us = queue.ns as f64 / queue.count as f64 / 1000.0;
    assert!(
        mean_us < 700.0,
        "a request waited {mean_us:.0} µs in the queue on average with a 200 µs delay"
    );
    worker.stop().await.unwrap();
}

/// Waiting cannot help a lone caller: after 8 waits in a row that nothing joined, a
/// request alone in the queue goes at once; requests that arrive together while the
/// instance is busy are batched again.
#[tokio::test]
async fn a_lone_caller_stops_waiting_and_company_is_batched_again() {
    let config = identity_config(
        r#"max_batch_size: 8
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 20000 }
parameters { key: "delay_ms" value: { string_value: "50" } }"#,
        "[ 4 ]",
    );
    let repo = Repo::new().identity("lone", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let one = || {
        request(
            "lone",
            vec![raw("INPUT0", "FP32", &[1, 4], f32s(&[1.5; 4]))],
        )
    };
    for _ in 0..8 {
        client.model_infer(one()).await.unwrap();
    }
    let queued = |s: &infermesh_proto::ModelStatistics| {
        let q = s.inference_stats.unwrap().queue.unwrap();
        (q.count, Duration::from_nanos(q.ns))
    };
    let (count, waited) = queued(&stats(&mut client, "lone").await);
    assert_eq!(count, 8);
    assert!(
        waited >= Duration::from_millis(8 * 20),
        "the first 8 waited the delay: {waited:?}"
    );
    for _ in 0..4 {
        client.model_infer(one()).await.unwrap();
    }
    let (_, after) = queued(&stats(&mut client, "lone").await);
    let mean = (after - waited) / 4;
    assert!(
        mean < Duration::from_millis(5),
        "a lone request still waited {mean:?} of the 20 ms delay"
    );

    let before = stats(&mut client, "lone").await.execution_count;
    let calls = (0..8).map(|_| {
        let mut c = client.clone();
        let req = one();
        tokio::spawn(async move { c.model_infer(req).await })
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(
            read_f32(output(&r.unwrap().unwrap().into_inner(), "OUTPUT0")),
            [1.5; 4]
        );
    }
    let s = stats(&mut client, "lone").await;
    assert_eq!(s.inference_count, 20);
    let runs = s.execution_count - before;
    assert!(
        runs <= 3,
        "8 requests arriving together ran in {runs} executions, not batched"
    );
    worker.stop().await.unwrap();
}
