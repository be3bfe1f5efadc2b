//! The gateway's way to one worker (`endpoint::upstream`) against a real worker: the one
//! choice between a stream message and a unary call, a cancel when the caller goes away,
//! and an idle stream closed.

use std::sync::Arc;

use infermesh_core::trace::Carry;
use infermesh_gateway::endpoint::{upstream, Endpoint};
use infermesh_proto::ModelInferRequest;
use infermesh_tests::{poll_until, repo::*, tensors::*, Worker};

fn ident(model: &str, n: usize) -> ModelInferRequest {
    request(
        model,
        vec![raw("INPUT0", "FP32", &[n as i64], f32s(&vec![1.5; n]))],
    )
}

/// The worker as the gateway sees it, with its state learned (ready, its models).
async fn endpoint(w: &Worker) -> Arc<Endpoint> {
    let ep = Endpoint::new(
        w.addr.to_string().as_str(),
        &Default::default(),
        Default::default(),
    )
    .unwrap();
    ep.refresh(std::time::Duration::from_secs(10)).await;
    assert!(ep.is_ready());
    ep
}

async fn attempt(ep: &Arc<Endpoint>, req: ModelInferRequest) {
    let bytes = prost::Message::encode_to_vec(&req);
    let size = bytes.len();
    let req = infermesh_core::raw::RawRequest::decode(bytes.into()).unwrap();
    let r = upstream::attempt(
        ep,
        &Arc::new(req),
        1,
        size,
        None,
        &Carry::default(),
        tracing::Span::none(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    r.encode(&mut answer);
    let r: infermesh_proto::ModelInferResponse = prost::Message::decode(&answer[..]).unwrap();
    assert_eq!(r.outputs.len(), 1);
}

fn open_streams(ep: &Endpoint) -> usize {
    ep.streams
        .lock()
        .unwrap()
        .iter()
        .filter(|s| !s.is_closed())
        .count()
}

#[tokio::test]
async fn small_requests_go_on_a_stream_large_ones_as_unary_calls() {
    let repo = Repo::new().identity("echo", &identity_config("", "[ -1 ]"));
    let w = Worker::start(repo.path(), &[]).await;
    let ep = endpoint(&w).await;
    // 300 KiB of floats: over the 256 KiB a stream message may carry.
    attempt(&ep, ident("echo", 300 * 1024 / 4)).await;
    assert_eq!(open_streams(&ep), 0, "a large request opened no stream");
    attempt(&ep, ident("echo", 4)).await;
    assert_eq!(open_streams(&ep), 1, "a small one went on a stream");
    attempt(&ep, ident("echo", 4)).await;
    assert_eq!(open_streams(&ep), 1, "and the next used the same stream");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_its_message_on_the_worker() {
    let config = identity_config(&delay_ms(1000), "[ 4 ]");
    let repo = Repo::new().identity("gate", &config);
    let w = Worker::start(repo.path(), &[]).await;
    let ep = endpoint(&w).await;
    let busy = {
        let ep = ep.clone();
        tokio::spawn(async move { attempt(&ep, ident("gate", 4)).await })
    };
    w.wait_metric(
        r#"infermesh_instances_busy{model="gate",version="1"}"#,
        |v| v == 1.0,
    )
    .await;
    let queued = {
        let ep = ep.clone();
        tokio::spawn(async move { attempt(&ep, ident("gate", 4)).await })
    };
    w.wait_metric(r#"infermesh_queue_depth{model="gate",version="1"}"#, |v| {
        v >= 1.0
    })
    .await;
    queued.abort();
    busy.await.unwrap();
    w.wait_metric(
        r#"infermesh_skipped_requests_total{model="gate",version="1",code="CANCELLED"}"#,
        |v| v >= 1.0,
    )
    .await;
    w.stop().await.unwrap();
}

/// A stream that carried nothing since the last idle check (every second) is closed, so
/// a draining worker never waits for its drain timeout on a stream nobody uses; the next
/// message opens a new one.
#[tokio::test]
async fn an_idle_stream_is_closed_and_the_next_message_opens_another() {
    let repo = Repo::new().identity("echo", &identity_config("", "[ 4 ]"));
    let w = Worker::start(repo.path(), &[]).await;
    let ep = endpoint(&w).await;
    attempt(&ep, ident("echo", 4)).await;
    assert_eq!(open_streams(&ep), 1);
    poll_until("the idle stream to close", || {
        let ep = ep.clone();
        async move { open_streams(&ep) == 0 }
    })
    .await;
    attempt(&ep, ident("echo", 4)).await;
    assert_eq!(open_streams(&ep), 1);
    w.stop().await.unwrap();
}
