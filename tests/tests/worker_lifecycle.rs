//! Health, readiness, reflection-free probes, a broken model, and shutdown.

use std::time::Duration;

use infermesh_proto::{
    ModelReadyRequest, RepositoryIndexRequest, ServerLiveRequest, ServerReadyRequest,
};
use infermesh_tests::{models, tensors::*, Worker};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

async fn health(url: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(r.into_inner().status())
}

/// A repository with the bundled models plus one whose model.onnx is garbage.
fn repo_with_broken_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for m in ["digits", "multi_io"] {
        std::os::unix::fs::symlink(models().join(m), dir.path().join(m)).unwrap();
    }
    let broken = dir.path().join("broken/1");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model.onnx"), b"this is not an onnx file").unwrap();
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    dir
}

#[tokio::test]
async fn a_broken_model_is_reported_and_the_others_serve() {
    let dir = repo_with_broken_model();
    let worker = Worker::start(dir.path(), &[]).await;
    let mut client = worker.client().await;

    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let state = |name: &str| {
        index
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} in index"))
    };
    assert_eq!(state("digits").state, "READY");
    assert_eq!(state("broken").state, "UNAVAILABLE");
    assert!(
        state("broken").reason.contains("model.onnx"),
        "{}",
        state("broken").reason
    );
    assert!(
        state("empty").reason.contains("no version directory"),
        "{}",
        state("empty").reason
    );

    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        client
            .model_ready(ready("digits"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("broken"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let err = client
        .model_infer(request(
            "broken",
            vec![raw("x", "FP32", &[1], f32s(&[0.0]))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("broken"), "{}", err.message());

    assert_eq!(
        health(&worker.url(), "").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        health(&worker.url(), "digits").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        health(&worker.url(), "broken").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        health(&worker.url(), "nope").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    worker.stop().await.unwrap();
}

/// SIGTERM path: health flips to NOT_SERVING during the grace period while requests are
/// still answered, then new requests are refused and `run` returns.
#[tokio::test]
async fn shutdown_goes_not_serving_then_drains_and_returns() {
    let worker = Worker::start(&models(), &["--shutdown-grace", "30s"]).await;
    let url = worker.url();
    let mut client = worker.client().await;
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let stopping = tokio::spawn(worker.stop());
    // Bounded poll for the observable change.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health(&url, "").await.unwrap() != ServingStatus::NotServing {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never went NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let (rows, labels) = digits_samples();
    let req = request(
        "digits",
        vec![raw("input", "FP32", &[1, 64], f32s(&rows[0]))],
    );
    let resp = client
        .model_infer(req)
        .await
        .expect("still serving during the grace period");
    assert_eq!(read_i64(output(resp.get_ref(), "label")), [labels[0]]);
    stopping.abort(); // the 30 s grace is not waited out here
}

/// Once draining, new requests are refused, but a stream opened before keeps being served
/// until the client ends it; then `run` returns Ok.
#[tokio::test]
async fn draining_refuses_new_requests_and_finishes_open_streams() {
    use futures::StreamExt;
    let worker = Worker::start(
        &models(),
        &["--shutdown-grace", "0s", "--drain-timeout", "30s"],
    )
    .await;
    let url = worker.url();
    let mut client = worker.client().await;
    let (rows, labels) = digits_samples();
    let digits = |i: usize| {
        let mut r = request(
            "digits",
            vec![raw("input", "FP32", &[1, 64], f32s(&rows[i]))],
        );
        r.id = format!("d{i}");
        r
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(digits(0)).await.unwrap();
    let first = responses
        .next()
        .await
        .unwrap()
        .unwrap()
        .infer_response
        .unwrap();
    assert_eq!(read_i64(output(&first, "label")), [labels[0]]);

    let stopping = tokio::spawn(worker.stop());
    // Bounded poll until a new connection's request is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let fresh =
            infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
                url.clone(),
            )
            .await;
        let refused = match fresh {
            Err(_) => true,
            Ok(mut c) => c.model_infer(digits(1)).await.is_err(),
        };
        if refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new requests were never refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    tx.send(digits(2)).await.unwrap();
    let second = responses.next().await.unwrap().unwrap();
    assert!(second.error_message.is_empty(), "{}", second.error_message);
    assert_eq!(
        read_i64(output(&second.infer_response.unwrap(), "label")),
        [labels[2]]
    );
    assert!(!stopping.is_finished(), "run waits for the open stream");
    drop(tx);
    assert!(responses.next().await.is_none(), "stream ends cleanly");
    stopping
        .await
        .unwrap()
        .expect("run returns Ok after draining");
}

/// KIND_GPU where CUDA is not usable (no GPU here, or a build without `cuda`) fails each
/// model's load with the reason, and the worker does not claim to be ready.
#[tokio::test]
async fn gpu_instances_without_a_gpu_fail_the_load_with_a_clear_reason() {
    let worker = Worker::spawn(&models(), &["--default-instance-kind", "gpu"]).await;
    let mut client = worker.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let index = loop {
        let index = client
            .repository_index(RepositoryIndexRequest::default())
            .await
            .unwrap()
            .into_inner()
            .models;
        if index.len() == 4 && index.iter().all(|m| m.state != "LOADING") {
            break index;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "models never finished loading: {index:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for m in &index {
        assert_eq!(m.state, "UNAVAILABLE", "{}", m.name);
        assert!(
            m.reason.contains("KIND_GPU") && m.reason.contains("CUDA"),
            "{}: {}",
            m.name,
            m.reason
        );
    }
    assert!(
        !client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert_eq!(
        health(&worker.url(), "").await.unwrap(),
        ServingStatus::NotServing
    );
    worker.stop().await.unwrap();
}

/// "liveness" is SERVING from the start and through shutdown, unlike "" (readiness).
#[tokio::test]
async fn liveness_service_stays_serving_while_draining() {
    let worker = Worker::start(&models(), &["--shutdown-grace", "30s"]).await;
    let url = worker.url();
    assert_eq!(
        health(&url, "liveness").await.unwrap(),
        ServingStatus::Serving
    );
    let stopping = tokio::spawn(worker.stop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health(&url, "").await.unwrap() != ServingStatus::NotServing {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never went NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        health(&url, "liveness").await.unwrap(),
        ServingStatus::Serving
    );
    stopping.abort();
}

/// The health port serves the same statuses as the gRPC port, and nothing else: a probe
/// that cannot speak TLS or send credentials still sees the truth.
#[tokio::test]
async fn the_health_port_answers_health_and_nothing_else() {
    let dir = repo_with_broken_model();
    let worker = Worker::start(dir.path(), &[]).await;
    let port = format!("http://{}", worker.health_addr);
    for service in ["", "liveness", "digits"] {
        assert_eq!(
            health(&port, service).await.unwrap(),
            health(&worker.url(), service).await.unwrap(),
            "{service:?}"
        );
        assert_eq!(
            health(&port, service).await.unwrap(),
            ServingStatus::Serving
        );
    }
    let unknown = health(&port, "no-such-model").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let mut other = infermesh_tests::client(&port).await;
    let err = other.server_live(ServerLiveRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    worker.stop().await.unwrap();
}
