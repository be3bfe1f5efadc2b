//! The gateway in front of real workers on loopback: every request balanced, stream
//! messages included; routing by model; aggregates; a worker leaving.

use std::time::Duration;

use futures::StreamExt;
use infermesh_proto::{ModelInferRequest, ModelStatisticsRequest, RepositoryIndexRequest};
use infermesh_tests::{repo::*, tensors::*, Client, Gateway, Worker};
use tonic::Code;

fn ident(model: &str, id: &str, v: f32) -> ModelInferRequest {
    let mut r = request(model, vec![raw("INPUT0", "FP32", &[4], f32s(&[v; 4]))]);
    r.id = id.into();
    r
}

async fn executions(w: &Worker, model: &str) -> u64 {
    let mut c = w.client().await;
    let req = ModelStatisticsRequest {
        name: model.into(),
        version: String::new(),
    };
    c.model_statistics(req)
        .await
        .unwrap()
        .into_inner()
        .model_stats[0]
        .execution_count
}

fn echo_repo() -> Repo {
    Repo::new().identity("echo", &identity_config("", "[ 4 ]"))
}

async fn two_workers() -> (Repo, Worker, Worker) {
    let repo = echo_repo();
    let a = Worker::start(repo.path(), &[]).await;
    let b = Worker::start(repo.path(), &[]).await;
    (repo, a, b)
}

#[tokio::test]
async fn unary_requests_spread_over_both_workers() {
    let (_repo, a, b) = two_workers().await;
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let client = gw.client().await;
    let calls = (0..200).map(|i| {
        let mut c = client.clone();
        tokio::spawn(async move { c.model_infer(ident("echo", &i.to_string(), i as f32)).await })
    });
    for (i, r) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        let r = r
            .unwrap()
            .expect("request through the gateway")
            .into_inner();
        assert_eq!(read_f32(output(&r, "OUTPUT0")), [i as f32; 4]);
        assert_eq!(r.id, i.to_string());
    }
    let (ea, eb) = (executions(&a, "echo").await, executions(&b, "echo").await);
    assert_eq!(ea + eb, 200);
    assert!(ea > 0 && eb > 0, "both workers served: {ea} / {eb}");
    gw.stop().await.unwrap();
}

/// The point of the gateway: one stream's messages go to several workers, and come back
/// in order with their ids.
#[tokio::test]
async fn one_stream_is_balanced_per_message() {
    let config = identity_config(&delay_ms(2), "[ 4 ]");
    let repo = Repo::new().identity("echo", &config);
    let a = Worker::start(repo.path(), &[]).await;
    let b = Worker::start(repo.path(), &[]).await;
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let mut client = gw.client().await;
    let mut msgs: Vec<ModelInferRequest> = (0..400)
        .map(|i| ident("echo", &format!("m{i}"), i as f32))
        .collect();
    msgs.insert(50, ident("no_such_model", "bad", 0.0));
    let mut responses = client
        .model_stream_infer(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(item) = responses.next().await {
        let item = item.expect("stream stays up");
        let resp = item.infer_response.unwrap();
        if resp.id == "bad" {
            assert!(
                item.error_message.contains("unknown model 'no_such_model'"),
                "{}",
                item.error_message
            );
        } else {
            assert!(item.error_message.is_empty(), "{}", item.error_message);
            let i: f32 = resp.id[1..].parse().unwrap();
            assert_eq!(read_f32(output(&resp, "OUTPUT0")), [i; 4]);
        }
        ids.push(resp.id);
    }
    let mut want: Vec<String> = (0..400).map(|i| format!("m{i}")).collect();
    want.insert(50, "bad".into());
    assert_eq!(ids, want, "responses in request order");
    let (ea, eb) = (executions(&a, "echo").await, executions(&b, "echo").await);
    assert_eq!(ea + eb, 400);
    // Each worker's own statistics grew by at least a quarter of the stream.
    assert!(
        ea >= 100 && eb >= 100,
        "one stream spread over both workers: {ea} / {eb}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn requests_go_only_where_the_model_is_and_errors_name_it() {
    let only_a = Repo::new()
        .identity("echo", &identity_config("", "[ 4 ]"))
        .identity("special", &identity_config("", "[ 2 ]"));
    let a = Worker::start(only_a.path(), &[]).await;
    let repo_b = echo_repo();
    let b = Worker::start(repo_b.path(), &[]).await;
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let mut client = gw.client().await;
    for _ in 0..20 {
        let r = request(
            "special",
            vec![raw("INPUT0", "FP32", &[2], f32s(&[1.0, 2.0]))],
        );
        client.model_infer(r).await.unwrap();
    }
    assert_eq!(executions(&a, "special").await, 20);

    let err = client
        .model_infer(ident("nope", "x", 0.0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("'nope'"), "{}", err.message());
    // A worker's own error passes through unchanged.
    let bad = request("echo", vec![raw("INPUT0", "FP32", &[5], f32s(&[0.0; 5]))]);
    let err = client.model_infer(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("dim 0 is 5"), "{}", err.message());

    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let special = index.iter().find(|m| m.name == "special").unwrap();
    assert_eq!(special.state, "READY");
    assert!(
        special.reason.contains(&a.addr.to_string())
            && !special.reason.contains(&b.addr.to_string())
    );
    gw.stop().await.unwrap();
}

/// Statistics are sums over workers and never go down when a worker leaves; traffic moves
/// to the worker that is left.
#[tokio::test]
async fn a_worker_leaving_keeps_statistics_and_traffic_moves() {
    let (_repo, a, b) = two_workers().await;
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let mut client = gw.client().await;
    for i in 0..40 {
        client
            .model_infer(ident("echo", "", i as f32))
            .await
            .unwrap();
    }
    let stats = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            let req = ModelStatisticsRequest {
                name: "echo".into(),
                version: String::new(),
            };
            c.model_statistics(req)
                .await
                .unwrap()
                .into_inner()
                .model_stats[0]
                .inference_count
        }
    };
    assert_eq!(stats(&mut client).await, 40);
    b.stop().await.unwrap();
    // Bounded poll until the gateway stops choosing the stopped worker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut ok_in_a_row = 0;
    while ok_in_a_row < 20 {
        match client.model_infer(ident("echo", "", 1.0)).await {
            Ok(_) => ok_in_a_row += 1,
            Err(_) => ok_in_a_row = 0,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "traffic never settled on the remaining worker"
        );
    }
    assert!(stats(&mut client).await >= 60, "sums never go down");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_worker_gets_little_of_the_traffic() {
    let slow = Repo::new().identity("echo", &identity_config(&delay_ms(50), "[ 4 ]"));
    let fast = echo_repo();
    let (s, f) = (
        Worker::start(slow.path(), &[]).await,
        Worker::start(fast.path(), &[]).await,
    );
    let gw = Gateway::start(&[&s, &f], &[]).await;
    let client = gw.client().await;
    let tasks = (0..8).map(|_| {
        let mut c = client.clone();
        tokio::spawn(async move {
            for i in 0..25 {
                c.model_infer(ident("echo", "", i as f32)).await.unwrap();
            }
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .for_each(|t| t.unwrap());
    let (es, ef) = (executions(&s, "echo").await, executions(&f, "echo").await);
    assert_eq!(es + ef, 200);
    assert!(ef >= 140, "the fast worker took {ef} of 200 (slow: {es})");
    gw.stop().await.unwrap();
}

/// A model unloaded on one worker while requests flow: the gateway retries those the
/// worker refuses and stops routing there; clients see no error.
#[tokio::test]
async fn unloading_a_model_on_one_worker_costs_no_client_errors() {
    let repo = echo_repo();
    let flags = ["--model-control-mode", "explicit", "--load-model", "*"];
    let (a, b) = (
        Worker::start(repo.path(), &flags).await,
        Worker::start(repo.path(), &flags).await,
    );
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let client = gw.client().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (mut c, stop) = (client.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !*stop.borrow() {
                    c.model_infer(ident("echo", "", 1.0))
                        .await
                        .expect("no client error");
                    n += 1;
                }
                n
            })
        })
        .collect();
    a.unload("echo").await;
    // Keep the load on until B alone has served 200 more requests.
    let before = executions(&b, "echo").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while executions(&b, "echo").await < before + 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "traffic did not move to the other worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(true).unwrap();
    for l in load {
        assert!(l.await.unwrap() > 0);
    }
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn no_ready_worker_is_unavailable_naming_model_and_workers() {
    let (_repo, a, b) = two_workers().await;
    let (addr_a, addr_b) = (a.addr.to_string(), b.addr.to_string());
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let mut client = gw.client().await;
    client.model_infer(ident("echo", "", 1.0)).await.unwrap();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        match client.model_infer(ident("echo", "", 1.0)).await {
            Err(e) if e.message().contains("no ready worker") => break e,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the pool never emptied"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("'echo'"), "{}", err.message());
    assert!(
        err.message().contains(&addr_a) && err.message().contains(&addr_b),
        "{}",
        err.message()
    );
    gw.stop().await.unwrap();
}

/// A gateway in front of one worker whose model "gate" takes 1 s per batch.
async fn slow_gate() -> (Repo, Worker, Gateway) {
    let config = identity_config(&delay_ms(1000), "[ 4 ]");
    let repo = Repo::new().identity("gate", &config);
    let w = Worker::start(repo.path(), &[]).await;
    let gw = Gateway::start(&[&w], &[]).await;
    (repo, w, gw)
}

/// Deadlines and cancels cross the gateway: expired work is answered DEADLINE_EXCEEDED,
/// cancelled work is dropped, and neither runs on the worker.
#[tokio::test]
async fn deadlines_and_cancels_reach_the_worker() {
    let (_repo, w, gw) = slow_gate().await;
    let mut client = gw.client().await;
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.model_infer(ident("gate", "", 1.0)).await });
    w.wait_metric(
        r#"infermesh_instances_busy{model="gate",version="1"}"#,
        |v| v == 1.0,
    )
    .await;

    let mut timed = tonic::Request::new(ident("gate", "", 1.0));
    timed.set_timeout(Duration::from_millis(100));
    let err = client.model_infer(timed).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err}"
    );

    let mut c = client.clone();
    let doomed = tokio::spawn(async move { c.model_infer(ident("gate", "", 1.0)).await });
    w.wait_metric(r#"infermesh_queue_depth{model="gate",version="1"}"#, |v| {
        v >= 1.0
    })
    .await;
    doomed.abort();

    first.await.unwrap().unwrap();
    let skipped = |code: &str| {
        format!(r#"infermesh_skipped_requests_total{{model="gate",version="1",code="{code}"}}"#)
    };
    let expired = w.metric(&skipped("DEADLINE_EXCEEDED")).await.unwrap_or(0.0);
    w.wait_metric(&skipped("CANCELLED"), |v| v + expired >= 2.0)
        .await;
    assert_eq!(
        executions(&w, "gate").await,
        1,
        "only the first request ran"
    );
    gw.stop().await.unwrap();
}

/// A client that closes its stream cancels its messages still queued on the worker: the
/// gateway's own stream to the worker ends with the client's.
#[tokio::test]
async fn a_closed_stream_cancels_its_queued_messages_on_the_worker() {
    let (_repo, w, gw) = slow_gate().await;
    let mut client = gw.client().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(ident("gate", "first", 1.0)).unwrap();
    let mut responses = client
        .model_stream_infer(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    w.wait_metric(
        r#"infermesh_instances_busy{model="gate",version="1"}"#,
        |v| v == 1.0,
    )
    .await;
    tx.send(ident("gate", "doomed", 2.0)).unwrap();
    w.wait_metric(r#"infermesh_queue_depth{model="gate",version="1"}"#, |v| {
        v >= 1.0
    })
    .await;
    drop(tx);
    drop(responses.next()); // not awaited: the client goes away
    drop(responses);
    w.wait_metric(
        r#"infermesh_skipped_requests_total{model="gate",version="1",code="CANCELLED"}"#,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        executions(&w, "gate").await,
        1,
        "only the first message ran"
    );
    gw.stop().await.unwrap();
}

/// Every RPC through the gateway answers what a worker answers (metadata, config,
/// readiness, inference), or the aggregate of workers (index, statistics).
#[tokio::test]
async fn every_rpc_answers_like_a_worker() {
    use infermesh_proto::{
        ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest,
        ServerReadyRequest,
    };
    let repo = infermesh_tests::models();
    let (a, b) = (
        Worker::start(&repo, &[]).await,
        Worker::start(&repo, &[]).await,
    );
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let (mut g, mut w) = (gw.client().await, a.client().await);
    for model in ["digits", "mlp", "multi_io", "all_types"] {
        let meta = ModelMetadataRequest {
            name: model.into(),
            version: String::new(),
        };
        assert_eq!(
            g.model_metadata(meta.clone()).await.unwrap().into_inner(),
            w.model_metadata(meta).await.unwrap().into_inner()
        );
        let config = ModelConfigRequest {
            name: model.into(),
            version: String::new(),
        };
        assert_eq!(
            g.model_config(config.clone()).await.unwrap().into_inner(),
            w.model_config(config).await.unwrap().into_inner()
        );
        let ready = ModelReadyRequest {
            name: model.into(),
            version: "1".into(),
        };
        assert!(g.model_ready(ready).await.unwrap().into_inner().ready);
    }
    assert!(
        g.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        g.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let (rows, labels) = digits_samples();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let req = request("digits", vec![raw("input", "FP32", &[8, 64], f32s(&flat))]);
    let (via_gw, direct) = (
        g.model_infer(req.clone()).await.unwrap().into_inner(),
        w.model_infer(req).await.unwrap().into_inner(),
    );
    assert_eq!(read_i64(output(&via_gw, "label")), labels);
    assert_eq!(via_gw.raw_output_contents, direct.raw_output_contents);
    let index = g
        .repository_index(RepositoryIndexRequest {
            ready: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(index.into_inner().models.len(), 4);
    let meta = g
        .server_metadata(infermesh_proto::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "infermesh-gateway");
    let err = g
        .repository_model_load(infermesh_proto::RepositoryModelLoadRequest {
            model_name: "mlp".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "Load/Unload are forwarded only when allowed"
    );
    gw.stop().await.unwrap();
}

/// With every worker refusing (a retryable RESOURCE_EXHAUSTED here), retries stay within
/// the budget: attempts ≤ requests × (1 + 0.2) + the floor (a 100 reserve, 10 per second).
/// Unbudgeted, each request would try both workers: 400 attempts.
#[tokio::test]
async fn with_every_worker_failing_the_retry_budget_holds() {
    let repo = echo_repo();
    // A queue of 0: every request is refused RESOURCE_EXHAUSTED (retryable) at once.
    let flags = ["--max-queue-size", "0"];
    let (a, b) = (
        Worker::start(repo.path(), &flags).await,
        Worker::start(repo.path(), &flags).await,
    );
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let mut client = gw.client().await;
    let start = std::time::Instant::now();
    for _ in 0..200 {
        let err = client
            .model_infer(ident("echo", "", 1.0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    }
    let secs = start.elapsed().as_secs_f64();
    let series = r#"infermesh_requests_total{model="echo",version="",code="ResourceExhausted"}"#;
    let attempts = a.metric(series).await.unwrap_or(0.0) + b.metric(series).await.unwrap_or(0.0);
    assert!(attempts >= 200.0, "{attempts}");
    let bound = 200.0 * 1.2 + 100.0 + 10.0 * secs + 1.0;
    assert!(
        attempts <= bound,
        "{attempts} attempts for 200 requests (bound {bound:.0})"
    );
    gw.stop().await.unwrap();
}

/// The gateway's own metrics follow what it did.
#[tokio::test]
async fn gateway_metrics_count_requests_workers_and_streams() {
    let (_repo, a, b) = two_workers().await;
    let gw = Gateway::start(&[&a, &b], &[]).await;
    let mut client = gw.client().await;
    for i in 0..10 {
        client
            .model_infer(ident("echo", "", i as f32))
            .await
            .unwrap();
    }
    client
        .model_infer(ident("nope", "", 0.0))
        .await
        .unwrap_err();
    let addr = gw.metrics_addr;
    let m = move |s: &'static str| infermesh_tests::metric_at(addr, s);
    assert_eq!(
        m(r#"infermesh_gateway_requests_total{model="echo",code="Ok"}"#).await,
        Some(10.0)
    );
    assert_eq!(
        m(r#"infermesh_gateway_requests_total{model="(unknown)",code="NotFound"}"#).await,
        Some(1.0)
    );
    assert_eq!(
        m(r#"infermesh_gateway_discovery_changes_total{change="insert"}"#).await,
        Some(2.0)
    );
    for w in [&a, &b] {
        let ready = format!(r#"infermesh_gateway_worker_ready{{worker="{}"}}"#, w.addr);
        assert_eq!(infermesh_tests::metric_at(addr, &ready).await, Some(1.0));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut stream = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(ident("echo", "s", 1.0)).await.unwrap();
    stream.next().await.unwrap().unwrap();
    // The message went on over a stream to a worker (idle ones close after a second).
    let mut upstream = 0.0;
    for w in [&a, &b] {
        let open = format!(r#"infermesh_gateway_worker_streams{{worker="{}"}}"#, w.addr);
        upstream += infermesh_tests::metric_at(addr, &open).await.unwrap();
    }
    assert!(upstream >= 1.0, "no stream to a worker counted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while m("infermesh_gateway_open_streams").await != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "open stream not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop((tx, stream));
    // Process metrics come with every endpoint.
    assert!(m("process_resident_memory_bytes").await.unwrap() > 1e6);
    assert!(m("process_open_fds").await.unwrap() > 0.0);
    assert!(a.metric("process_cpu_seconds_total").await.unwrap() > 0.0);
    gw.stop().await.unwrap();
}

/// The gateway's health port follows its health: "" with the pool, each model with the
/// workers that have it ready.
#[tokio::test]
async fn the_gateway_health_port_follows_the_pool_and_its_models() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let (_repo, w1, w2) = two_workers().await;
    let gw = Gateway::start(&[&w1, &w2], &[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let h = HealthClient::new(channel);
    let status = |service: &str| {
        let mut h = h.clone();
        let service = service.to_string();
        async move {
            h.check(HealthCheckRequest { service })
                .await
                .map(|r| r.into_inner().status())
        }
    };
    // Health follows the pool's refreshes: watch each entry come to SERVING.
    for service in ["", "echo"] {
        let mut watch = h
            .clone()
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(r) = watch.next().await {
                if r.unwrap().status() == ServingStatus::Serving {
                    return;
                }
            }
            panic!("the watch ended");
        })
        .await
        .unwrap_or_else(|_| panic!("{service:?} SERVING on the health port"));
    }
    assert_eq!(status("echo").await.unwrap(), ServingStatus::Serving);
    let err = status("no-such-model").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Nothing but health there.
    let err = infermesh_tests::client(&format!("http://{}", gw.health_addr))
        .await
        .server_ready(infermesh_proto::ServerReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    gw.stop().await.unwrap();
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
}

/// Load, then route: a model loaded through the gateway serves the very next request,
/// though the gateway's own refresh would not come for a minute.
#[tokio::test]
async fn a_model_loaded_through_the_gateway_is_routable_at_once() {
    let config = identity_config("", "[ 4 ]");
    let repo = Repo::new()
        .identity("echo", &config)
        .identity("other", &config);
    let explicit = ["--model-control-mode", "explicit"];
    let w = Worker::start(
        repo.path(),
        &[&explicit[..], &["--load-model", "other"]].concat(),
    )
    .await;
    let gw = Gateway::start(
        &[&w],
        &[&explicit[..], &["--worker-refresh", "60s"]].concat(),
    )
    .await;
    let mut client = gw.client().await;
    client
        .repository_model_load(infermesh_proto::RepositoryModelLoadRequest {
            model_name: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = client.model_infer(ident("echo", "first", 1.0)).await;
    assert_eq!(
        r.expect("routable as soon as Load answered")
            .into_inner()
            .id,
        "first"
    );
    gw.stop().await.unwrap();
}
