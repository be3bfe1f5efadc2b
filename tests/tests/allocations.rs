//! The gateway's allocations per request, counted (never timed): a stream message and a
//! unary request sent to a worker directly and through an in-process gateway, on one
//! current-thread runtime. What the gateway adds is the difference; it must stay under the
//! figure below, so a change that brings allocations back to the hot path fails here.

// A global allocator cannot be written without `unsafe`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use futures::StreamExt;
use infermesh_proto::ModelInferRequest;
use infermesh_tests::{repo::*, tensors::*, Gateway, Worker};
use tokio_stream::wrappers::ReceiverStream;

/// Allocations the gateway may add to one stream message and to one unary request (what
/// was measured when this guard was set, plus a little room for background noise).
const STREAM_LIMIT: f64 = 25.0;
const UNARY_LIMIT: f64 = 25.0;

/// Counts allocations in every thread.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counter is a static
// atomic, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const N: u64 = 500;

fn echo() -> ModelInferRequest {
    let mut r = request(
        "echo",
        vec![raw("INPUT0", "FP32", &[4], f32s(&[1.0, 2.0, 3.0, 4.0]))],
    );
    r.id = "a-client-id".into();
    r
}

/// The fewest allocations per request over three rounds of N (background work such as a
/// health poll can land in one round, never in all three), after a warm-up round.
async fn per_request(mut round: impl AsyncFnMut()) -> f64 {
    round().await;
    let mut best = u64::MAX;
    for _ in 0..3 {
        let before = ALLOCS.load(Relaxed);
        round().await;
        best = best.min(ALLOCS.load(Relaxed) - before);
    }
    best as f64 / N as f64
}

/// Allocations per message on one stream, one message in flight at a time.
async fn stream_allocs(url: &str) -> f64 {
    let mut client = infermesh_tests::client(url).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .model_stream_infer(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let req = echo();
    per_request(async || {
        for _ in 0..N {
            tx.send(req.clone()).await.unwrap();
            let answer = answers.next().await.unwrap().unwrap();
            assert!(answer.error_message.is_empty(), "{}", answer.error_message);
            assert_eq!(answer.infer_response.unwrap().id, "a-client-id");
        }
    })
    .await
}

/// Allocations per unary request, one at a time on one connection.
async fn unary_allocs(url: &str) -> f64 {
    let client = infermesh_tests::client(url).await;
    let req = echo();
    per_request(async || {
        for _ in 0..N {
            let resp = client.clone().model_infer(req.clone()).await.unwrap();
            assert_eq!(resp.into_inner().id, "a-client-id");
        }
    })
    .await
}

#[tokio::test]
async fn the_gateway_adds_few_allocations_per_request() {
    let repo = Repo::new().identity("echo", &identity_config("", "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    // No worker polls during the count (they allocate, and are not per request).
    let gw = Gateway::start(&[&worker], &["--worker-refresh", "600s"]).await;

    let direct = stream_allocs(&worker.url()).await;
    let through = stream_allocs(&gw.url()).await;
    let stream = through - direct;
    let direct_unary = unary_allocs(&worker.url()).await;
    let through_unary = unary_allocs(&gw.url()).await;
    let unary = through_unary - direct_unary;
    println!(
        "allocations per request: stream message {direct:.1} direct, {through:.1} through the \
         gateway (+{stream:.1}); unary {direct_unary:.1} direct, {through_unary:.1} through the \
         gateway (+{unary:.1})"
    );
    assert!(
        stream <= STREAM_LIMIT,
        "the gateway adds {stream:.1} allocations per stream message (at most {STREAM_LIMIT})"
    );
    assert!(
        unary <= UNARY_LIMIT,
        "the gateway adds {unary:.1} allocations per unary request (at most {UNARY_LIMIT})"
    );
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}
