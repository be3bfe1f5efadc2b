use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;

type Sent = Result<Frame<Bytes>, std::convert::Infallible>;

/// A body fed by the test, frame by frame.
fn body(
    limits: Limits,
) -> (
    mpsc::UnboundedSender<Sent>,
    Counted<impl Body<Data = Bytes, Error = std::convert::Infallible>>,
) {
    counted(limits, false)
}

fn counted(
    limits: Limits,
    stream: bool,
) -> (
    mpsc::UnboundedSender<Sent>,
    Counted<impl Body<Data = Bytes, Error = std::convert::Infallible>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        tx,
        Counted::new(
            StreamBody::new(UnboundedReceiverStream::new(rx)),
            limits,
            stream,
        ),
    )
}

fn limits(budget: usize, max_message: usize) -> Limits {
    Limits {
        budget: ByteBudget::new(budget),
        max_message,
        max_message_is: "--grpc-max-message-bytes",
        stall: Duration::from_secs(30),
        min_rate: 0,
    }
}

fn prefix(len: u32) -> Vec<u8> {
    let mut p = vec![0u8];
    p.extend_from_slice(&len.to_be_bytes());
    p
}

fn data(b: impl Into<Bytes>) -> Sent {
    Ok(Frame::data(b.into()))
}

fn code(e: Box<dyn std::error::Error + Send + Sync>) -> tonic::Code {
    e.downcast::<Status>().expect("a status").code()
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_on_its_prefix() {
    let (tx, mut b) = body(limits(0, 1000));
    tx.send(data(prefix(2_000_000_000))).unwrap();
    let err = b.frame().await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::ResourceExhausted);
    assert!(b.frame().await.is_none(), "nothing more is read");
}

#[tokio::test]
async fn a_declared_length_over_the_budget_left_is_refused_before_buffering() {
    let l = limits(1000, 1 << 20);
    let _other = l.budget.acquire(600).unwrap();
    let (tx, mut b) = body(l.clone());
    tx.send(data(prefix(500))).unwrap();
    let err = b.frame().await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::ResourceExhausted);
    assert_eq!(
        l.budget.in_flight(),
        600,
        "the refused message holds nothing"
    );
}

#[tokio::test]
async fn bytes_count_while_a_message_arrives_and_return_when_it_is_complete() {
    let l = limits(1 << 20, 1 << 20);
    let (tx, mut b) = body(l.clone());
    // The prefix split across frames, then the payload in two parts.
    tx.send(data(prefix(100)[..2].to_vec())).unwrap();
    tx.send(data(prefix(100)[2..].to_vec())).unwrap();
    tx.send(data(vec![7u8; 60])).unwrap();
    for _ in 0..3 {
        b.frame().await.unwrap().unwrap();
    }
    assert_eq!(l.budget.in_flight(), 65);
    // The rest of it and a whole second message (empty) in one frame.
    let mut tail = vec![7u8; 40];
    tail.extend(prefix(0));
    tx.send(data(tail)).unwrap();
    b.frame().await.unwrap().unwrap();
    assert_eq!(l.budget.in_flight(), 0);
    drop(tx);
    assert!(b.frame().await.is_none());
}

#[tokio::test]
async fn a_dropped_body_returns_its_bytes() {
    let l = limits(1 << 20, 1 << 20);
    let (tx, mut b) = body(l.clone());
    tx.send(data([prefix(1000), vec![0u8; 500]].concat()))
        .unwrap();
    b.frame().await.unwrap().unwrap();
    assert_eq!(l.budget.in_flight(), 505);
    drop(b);
    assert_eq!(l.budget.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_message_that_stops_arriving_is_dropped_after_the_stall_timeout() {
    let l = limits(1 << 20, 1 << 20);
    let (tx, mut b) = body(l.clone());
    tx.send(data([prefix(1000), vec![0u8; 10]].concat()))
        .unwrap();
    b.frame().await.unwrap().unwrap();
    let start = tokio::time::Instant::now();
    let err = b.frame().await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(l.budget.in_flight(), 0);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn an_idle_stream_between_messages_never_stalls() {
    let l = limits(1 << 20, 1 << 20);
    let (tx, b) = body(l);
    tx.send(data([prefix(1), vec![1]].concat())).unwrap();
    let mut frames = b.into_data_stream();
    frames.next().await.unwrap().unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(3600), frames.next()).await;
    assert!(
        waited.is_err(),
        "still waiting for the next message after an hour"
    );
}

#[tokio::test]
async fn a_unary_call_over_the_budget_is_refused_as_it_arrives() {
    let l = limits(100, 1 << 20);
    let (tx, mut b) = body(l.clone());
    tx.send(data([prefix(90), vec![0u8; 50]].concat())).unwrap();
    b.frame().await.unwrap().unwrap();
    let _other = l.budget.acquire(40).unwrap();
    tx.send(data(vec![0u8; 20])).unwrap();
    let err = b.frame().await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::ResourceExhausted);
    assert_eq!(
        l.budget.in_flight(),
        40,
        "the refused call's bytes are back"
    );
}

#[tokio::test]
async fn a_stream_waits_for_room_instead_of_failing() {
    let l = limits(100, 1 << 20);
    let (tx, b) = counted(l.clone(), true);
    let other = l.budget.acquire(90).unwrap();
    tx.send(data([prefix(30), vec![1u8; 30]].concat())).unwrap();
    let mut frames = b.into_data_stream();
    let waited = tokio::time::timeout(Duration::from_millis(50), frames.next()).await;
    assert!(waited.is_err(), "no room: the frame waits");
    let next = tokio::spawn(async move { frames.next().await.map(|f| f.map(|b| b.len())) });
    drop(other);
    let got = next.await.unwrap().unwrap().unwrap();
    assert_eq!(got, 35);
    assert_eq!(l.budget.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_message_trickled_below_the_minimum_rate_is_dropped() {
    // 1 KiB/s over a 30 s window: 30 KiB per window. One byte every 10 s never resets the
    // stall clock the way any progress used to.
    let l = Limits {
        min_rate: 1024,
        ..limits(1 << 20, 1 << 20)
    };
    let (tx, mut b) = body(l.clone());
    tx.send(data([prefix(100_000), vec![0u8; 10]].concat()))
        .unwrap();
    b.frame().await.unwrap().unwrap();
    let start = tokio::time::Instant::now();
    let trickle = tokio::spawn({
        let tx = tx.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if tx.send(data(vec![0u8])).is_err() {
                    return;
                }
            }
        }
    });
    let err = loop {
        match b.frame().await.unwrap() {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(code(err), tonic::Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(l.budget.in_flight(), 0, "its bytes are released");
    trickle.abort();
}

#[tokio::test]
async fn a_tenant_over_its_share_is_refused_while_another_is_served() {
    let process = ByteBudget::new(1000);
    let (alice, bob) = (
        process.share(0.5, "alice's share"),
        process.share(0.5, "bob"),
    );
    let mut l = limits(0, 1 << 20);
    l.budget = alice.clone();
    // alice holds most of her share with a message that has not finished arriving...
    let (_tx_a, mut a) = body(l.clone());
    _tx_a
        .send(data([prefix(490), vec![0u8; 395]].concat()))
        .unwrap();
    a.frame().await.unwrap().unwrap();
    assert_eq!(alice.in_flight(), 400);
    assert_eq!(process.in_flight(), 400);
    // ...so her next call is refused at its prefix, naming her share,
    let (tx, mut a2) = body(l);
    tx.send(data(prefix(300))).unwrap();
    let err = a2.frame().await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::ResourceExhausted);
    // while bob's call of the same size is served from his.
    let mut lb = limits(0, 1 << 20);
    lb.budget = bob.clone();
    let (tx, mut b) = body(lb);
    tx.send(data([prefix(400), vec![0u8; 400]].concat()))
        .unwrap();
    b.frame().await.unwrap().unwrap();
    assert_eq!(
        process.in_flight(),
        400,
        "bob's complete message is released"
    );
}
