//! The forward path with fake workers on paused time: which failures move a request to
//! another worker, the retry budget, the deadline, and poison containment.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use infermesh_core::{reason, Reason};
use tonic::Code;

use super::*;
use crate::route::Policy;

/// What a fake worker does with one attempt.
#[derive(Clone)]
enum Act {
    Answer,
    Fail(Status),
    /// Answers after this long (for deadlines).
    Slow(Duration),
}

#[derive(Default)]
struct Fake {
    /// Per worker, its script; a worker whose script is empty answers.
    scripts: Mutex<Vec<(String, VecDeque<Act>)>>,
    /// (worker, failure) for every attempt, in order.
    log: Mutex<Vec<(String, Option<Failure>)>>,
    /// Every worker an attempt went to.
    attempted: Mutex<Vec<String>>,
    /// What the route's p99 is said to be.
    p99: Mutex<Option<Duration>>,
    policy: Arc<Policy>,
    /// The version each worker holds; empty: every worker holds version 1.
    holds: Vec<(String, i64)>,
    /// The hedge delay the mesh reports (the policy must have a hedge rule too).
    hedge: Option<Duration>,
    /// Every time observed, in order.
    observed: Mutex<Vec<Duration>>,
}

impl Fake {
    fn new(workers: &[(&str, Vec<Act>)]) -> Self {
        Self {
            scripts: Mutex::new(
                workers
                    .iter()
                    .map(|(w, acts)| (w.to_string(), acts.iter().cloned().collect()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn log(&self) -> Vec<(String, Option<Failure>)> {
        self.log.lock().unwrap().clone()
    }
}

impl Mesh for Fake {
    type Worker = String;

    fn route(&self, model: &str, version: &str) -> Result<Target, Error> {
        let selector = crate::route::selector(model, version)?;
        let version = match selector {
            crate::route::Selector::Named(v) => v,
            crate::route::Selector::Newest | crate::route::Selector::Split => {
                self.holds.iter().map(|h| h.1).max().unwrap_or(1)
            }
        };
        Ok(Target {
            model: model.into(),
            selector,
            version,
            policy: self.policy.clone(),
        })
    }

    fn reroute(&self, target: &Target, without: &[i64]) -> Option<Target> {
        let version = self
            .holds
            .iter()
            .map(|h| h.1)
            .filter(|v| !without.contains(v))
            .max()?;
        (target.selector == crate::route::Selector::Newest).then(|| Target {
            version,
            ..target.clone()
        })
    }

    fn balance(&self, target: &Target, tried: &[String]) -> Option<(String, bool)> {
        let scripts = self.scripts.lock().unwrap();
        let holds = |w: &String| {
            self.holds.is_empty()
                || self
                    .holds
                    .iter()
                    .any(|h| &h.0 == w && h.1 == target.version)
        };
        let mut untried = scripts
            .iter()
            .map(|(w, _)| w)
            .filter(|w| !tried.contains(w) && holds(w));
        let worker = untried.next()?.clone();
        Some((worker, untried.next().is_some()))
    }

    fn no_worker(&self, _: &Target) -> Error {
        Error::Unavailable("no ready worker".into())
    }

    fn addr(w: &String) -> &str {
        w
    }

    fn attempt(
        &self,
        w: &String,
        _: &Arc<RawRequest>,
        _: i64,
        left: Option<Duration>,
        _: usize,
    ) -> impl Future<Output = Result<RawAnswer, Status>> + Send {
        self.attempted.lock().unwrap().push(w.clone());
        let act = {
            let mut scripts = self.scripts.lock().unwrap();
            let script = &mut scripts.iter_mut().find(|(x, _)| x == w).unwrap().1;
            script.pop_front().unwrap_or(Act::Answer)
        };
        let w = w.clone();
        async move {
            let answer = || {
                Ok(RawAnswer {
                    bytes: Default::default(),
                    id: w.clone(),
                })
            };
            match act {
                Act::Answer => answer(),
                Act::Fail(s) => Err(s),
                // As the real attempt: bounded by what is left of the deadline.
                Act::Slow(d) => {
                    match tokio::time::timeout(left.unwrap_or(d * 2), tokio::time::sleep(d)).await {
                        Ok(()) => answer(),
                        Err(_) => Err(Status::cancelled("Timeout expired")),
                    }
                }
            }
        }
    }

    fn learn(&self, w: &String, _: &str, failed: Option<(Failure, &Status)>) {
        self.log
            .lock()
            .unwrap()
            .push((w.clone(), failed.map(|f| f.0)));
    }

    fn p99(&self, _: &Target) -> Option<Duration> {
        *self.p99.lock().unwrap()
    }

    fn observe(&self, _: &Target, took: Duration) {
        self.observed.lock().unwrap().push(took);
    }

    fn hedge_after(&self, _: &Target) -> Option<Duration> {
        self.hedge
    }
}

struct Env {
    budget: Budget,
    quarantine: Quarantine,
    metrics: GatewayMetrics,
}

impl Env {
    fn new(budget: Budget) -> Self {
        Self {
            budget,
            quarantine: Quarantine::new(Duration::from_secs(600), Default::default()),
            metrics: Default::default(),
        }
    }

    fn retries(&self) -> Retries<'_> {
        Retries {
            budget: &self.budget,
            quarantine: &self.quarantine,
            metrics: &self.metrics,
            bytes: None,
        }
    }
}

fn generous() -> Env {
    Env::new(Budget::new(Duration::from_secs(10), 100, 1.0))
}

fn req() -> Arc<RawRequest> {
    let req = infermesh_proto::ModelInferRequest {
        model_name: "m".into(),
        ..Default::default()
    };
    Arc::new(RawRequest::decode(prost::Message::encode_to_vec(&req).into()).unwrap())
}

fn because(code: Code, r: Reason) -> Status {
    reason::status(code, "words do not matter", r)
}

fn broken() -> Status {
    let mut s = Status::unavailable("connection reset");
    s.set_source(Arc::new(crate::poison::WorkerBroke));
    s
}

#[tokio::test(start_paused = true)]
async fn failures_that_did_not_answer_move_to_another_worker() {
    for (status, failure) in [
        (
            because(Code::Unavailable, Reason::Draining),
            Failure::Refusing,
        ),
        (
            because(Code::Unavailable, Reason::ModelNotReady),
            Failure::ModelGone,
        ),
        (
            because(Code::ResourceExhausted, Reason::QueueFull),
            Failure::Busy,
        ),
        (
            because(Code::ResourceExhausted, Reason::OverBudget),
            Failure::Busy,
        ),
        (broken(), Failure::Broken),
    ] {
        let fake = Fake::new(&[("w1", vec![Act::Fail(status)]), ("w2", vec![])]);
        let env = generous();
        let resp = forward(&fake, &env.retries(), &req(), "", None)
            .await
            .unwrap();
        assert_eq!(resp.id, "w2", "{failure:?}");
        assert_eq!(
            fake.log(),
            [("w1".into(), Some(failure)), ("w2".into(), None)]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn answers_about_the_request_itself_are_final() {
    for r in [
        Reason::Invalid,
        Reason::Engine,
        Reason::Deadline,
        Reason::CancelledAfterRun,
    ] {
        let fake = Fake::new(&[
            ("w1", vec![Act::Fail(because(Code::InvalidArgument, r))]),
            ("w2", vec![]),
        ]);
        let env = generous();
        let err = forward(&fake, &env.retries(), &req(), "", None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{r}");
        assert_eq!(fake.log().len(), 1, "{r}: not retried");
    }
}

#[tokio::test(start_paused = true)]
async fn with_no_worker_left_the_last_failure_is_the_answer() {
    let busy = || Act::Fail(because(Code::ResourceExhausted, Reason::QueueFull));
    let fake = Fake::new(&[("w1", vec![busy()]), ("w2", vec![busy()])]);
    let env = generous();
    let err = forward(&fake, &env.retries(), &req(), "", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason::of_status(&err), Some(Reason::QueueFull));
    assert_eq!(fake.log().len(), 2);
}

/// A broken connection is not the request's fault, whatever code the transport said it
/// with: the client is told UNAVAILABLE `worker-unreachable` (retry later).
#[tokio::test(start_paused = true)]
async fn a_last_broken_connection_answers_worker_unreachable() {
    let mut unknown = Status::unknown("transport error");
    unknown.set_source(Arc::new(std::io::Error::other("reset")));
    for status in [
        broken(),
        unknown,
        Status::cancelled("operation was canceled"),
    ] {
        let fake = Fake::new(&[("w1", vec![Act::Fail(status)])]);
        let env = generous();
        let err = forward(&fake, &env.retries(), &req(), "", None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert_eq!(reason::of_status(&err), Some(Reason::Unreachable));
        assert!(
            err.message().starts_with("worker w1 unreachable"),
            "{err:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_retry_budget_gives_up_and_counts_it() {
    let env = Env::new(Budget::new(Duration::from_secs(10), 0, 0.0));
    let fake = Fake::new(&[
        (
            "w1",
            vec![Act::Fail(because(Code::Unavailable, Reason::Draining))],
        ),
        ("w2", vec![]),
    ]);
    let err = forward(&fake, &env.retries(), &req(), "", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(fake.log().len(), 1);
    assert_eq!(env.metrics.retry_budget_exhausted.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_policy_without_retries_answers_the_first_failure() {
    let mut fake = Fake::new(&[
        (
            "w1",
            vec![Act::Fail(because(Code::Unavailable, Reason::Draining))],
        ),
        ("w2", vec![]),
    ]);
    fake.policy = Arc::new(Policy {
        retry: false,
        ..Default::default()
    });
    let env = generous();
    assert!(forward(&fake, &env.retries(), &req(), "", None)
        .await
        .is_err());
    assert_eq!(fake.log().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_every_attempt() {
    let fake = Fake::new(&[
        ("w1", vec![Act::Slow(Duration::from_secs(5))]),
        ("w2", vec![]),
    ]);
    let env = generous();
    let deadline = Instant::now() + Duration::from_secs(1);
    let started = Instant::now();
    let err = forward(&fake, &env.retries(), &req(), "", Some(deadline))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "answered at the deadline"
    );
    assert_eq!(
        *fake.attempted.lock().unwrap(),
        ["w1"],
        "no attempt after the deadline"
    );
    assert!(
        fake.log().is_empty(),
        "the client's deadline is not the worker's fault"
    );
    // A deadline already past never reaches a worker.
    assert_eq!(
        time_left(Some(Instant::now()), Instant::now())
            .unwrap_err()
            .code(),
        Code::DeadlineExceeded
    );
    assert_eq!(time_left(None, Instant::now()).unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_breaks_two_workers_is_quarantined() {
    let fake = Fake::new(&[
        ("w1", vec![Act::Fail(broken())]),
        ("w2", vec![Act::Fail(broken())]),
        ("w3", vec![]),
    ]);
    let env = generous();
    let err = forward(&fake, &env.retries(), &req(), "", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(fake.log().len(), 2, "the third worker is spared");
    let fp = env.quarantine.fingerprint(&req(), "");
    assert!(env.quarantine.refused(fp).is_some());
}

#[test]
fn decide_reads_failure_policy_and_budget() {
    let target = Target {
        model: "m".into(),
        selector: crate::route::Selector::Newest,
        version: 1,
        policy: Default::default(),
    };
    assert_eq!(decide(Failure::Busy, 0, &target, || true), Next::Retry);
    assert_eq!(decide(Failure::Busy, 0, &target, || false), Next::GiveUp);
    assert_eq!(decide(Failure::Final, 0, &target, || true), Next::GiveUp);
    assert_eq!(decide(Failure::Broken, 1, &target, || true), Next::Retry);
    assert_eq!(decide(Failure::Broken, 2, &target, || true), Next::Poisoned);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_attempt_gives_way_to_another_worker_in_time() {
    let fake = Fake::new(&[
        ("w1", vec![Act::Slow(Duration::from_secs(60))]),
        ("w2", vec![]),
    ]);
    *fake.p99.lock().unwrap() = Some(Duration::from_millis(10));
    let env = generous();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    let resp = forward(&fake, &env.retries(), &req(), "", Some(deadline))
        .await
        .unwrap();
    assert_eq!(resp.id, "w2");
    // max(4 × 10 ms, 200 ms): the stuck attempt gave way at 200 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert_eq!(fake.log()[0], ("w1".into(), Some(Failure::TimedOut)));
}

#[tokio::test(start_paused = true)]
async fn with_no_other_worker_or_no_history_an_attempt_gets_the_whole_deadline() {
    // Alone: a slow answer is still an answer.
    let fake = Fake::new(&[("w1", vec![Act::Slow(Duration::from_secs(3))])]);
    *fake.p99.lock().unwrap() = Some(Duration::from_millis(10));
    let env = generous();
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(
        forward(&fake, &env.retries(), &req(), "", Some(deadline))
            .await
            .unwrap()
            .id,
        "w1"
    );
    // No history yet: the first requests of a slow model are not cut short.
    let fake = Fake::new(&[
        ("w1", vec![Act::Slow(Duration::from_secs(3))]),
        ("w2", vec![]),
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(
        forward(&fake, &env.retries(), &req(), "", Some(deadline))
            .await
            .unwrap()
            .id,
        "w1"
    );
    // No deadline: no bound either (keepalive notices a worker that stopped answering).
    assert_eq!(attempt_bound(None, Some(Duration::from_millis(10))), None);
    assert_eq!(
        attempt_bound(Some(Duration::from_secs(1)), Some(Duration::from_secs(2))),
        Some(Bound {
            after: Duration::from_millis(500),
            own: false
        }),
        "never more than half of what is left"
    );
}

#[tokio::test(start_paused = true)]
async fn an_attempt_cut_by_a_short_client_deadline_is_not_held_against_its_worker() {
    // A 100 ms deadline gives a 50 ms bound, below the 200 ms floor: running past it says
    // nothing about the worker.
    let fake = Fake::new(&[
        ("w1", vec![Act::Slow(Duration::from_millis(80))]),
        ("w2", vec![Act::Slow(Duration::from_millis(80))]),
    ]);
    *fake.p99.lock().unwrap() = Some(Duration::from_millis(1));
    let env = generous();
    let deadline = Instant::now() + Duration::from_millis(100);
    let err = forward(&fake, &env.retries(), &req(), "", Some(deadline))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(fake.log()[0], ("w1".into(), Some(Failure::OutOfTime)));
    assert_eq!(
        attempt_bound(
            Some(Duration::from_secs(2)),
            Some(Duration::from_millis(10))
        ),
        Some(Bound {
            after: Duration::from_millis(200),
            own: true
        }),
        "the worker's own bound (200 ms floor) within a roomy deadline"
    );
}

/// A request that named no version moves on to the next version once no worker is left
/// for its own; a request that named one is never sent to another.
#[tokio::test(start_paused = true)]
async fn only_a_request_that_named_no_version_is_routed_again_to_another() {
    let gone = || because(Code::Unavailable, Reason::ModelNotReady);
    for (asked, answer) in [("", Some("w1")), ("2", None)] {
        let mut fake = Fake::new(&[("w1", vec![]), ("w2", vec![Act::Fail(gone())])]);
        fake.holds = vec![("w1".into(), 1), ("w2".into(), 2)];
        let env = generous();
        let got = forward(&fake, &env.retries(), &req(), asked, None).await;
        match answer {
            Some(w) => assert_eq!(got.unwrap().id, w),
            None => assert_eq!(got.unwrap_err().code(), Code::Unavailable),
        }
        let attempted = fake.attempted.lock().unwrap().clone();
        let want: Vec<String> = match answer {
            Some(_) => vec!["w2".into(), "w1".into()],
            None => vec!["w2".into()],
        };
        assert_eq!(attempted, want, "version {asked:?}");
    }
}

/// A fake whose policy hedges after `after`.
fn hedging(workers: &[(&str, Vec<Act>)], after: Duration) -> Fake {
    let mut fake = Fake::new(workers);
    fake.policy = Arc::new(Policy {
        hedge: Some(crate::routes::After::Ms(after.as_secs_f64() * 1000.0)),
        ..Default::default()
    });
    fake.hedge = Some(after);
    fake
}

fn counts(fake: &Fake) -> (u64, u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let r = &fake.policy.records;
    (
        r.counts.hedged.load(Relaxed),
        r.counts.won.load(Relaxed),
        r.hedge_won.get(),
        r.hedge_lost.get(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_hedge_goes_to_another_worker_after_the_delay_and_the_first_answer_wins() {
    let ms = Duration::from_millis;
    let fake = hedging(&[("w1", vec![Act::Slow(ms(100))]), ("w2", vec![])], ms(10));
    let env = generous();
    let started = tokio::time::Instant::now();
    let resp = forward(&fake, &env.retries(), &req(), "", None)
        .await
        .unwrap();
    assert_eq!(resp.id, "w2");
    assert_eq!(
        started.elapsed(),
        ms(10),
        "answered by the copy, not after the slow one"
    );
    assert_eq!(*fake.attempted.lock().unwrap(), ["w1", "w2"]);
    assert_eq!(counts(&fake), (1, 1, 1, 0));
    // The cancelled first attempt's 10 ms count in the percentile, beside the copy's 0.
    assert_eq!(*fake.observed.lock().unwrap(), [ms(10), ms(0)]);

    // The first attempt answers before the copy: the copy loses and is dropped.
    let fake = hedging(
        &[
            ("w1", vec![Act::Slow(ms(20))]),
            ("w2", vec![Act::Slow(ms(100))]),
        ],
        ms(10),
    );
    let started = tokio::time::Instant::now();
    let resp = forward(&fake, &env.retries(), &req(), "", None)
        .await
        .unwrap();
    assert_eq!((resp.id.as_str(), started.elapsed()), ("w1", ms(20)));
    assert_eq!(counts(&fake), (1, 0, 0, 1));

    // A copy that fails leaves the race to the first attempt.
    let busy = because(Code::ResourceExhausted, Reason::QueueFull);
    let fake = hedging(
        &[
            ("w1", vec![Act::Slow(ms(50))]),
            ("w2", vec![Act::Fail(busy)]),
        ],
        ms(10),
    );
    let resp = forward(&fake, &env.retries(), &req(), "", None)
        .await
        .unwrap();
    assert_eq!(resp.id, "w1");
    assert_eq!(
        fake.log(),
        [("w2".into(), Some(Failure::Busy)), ("w1".into(), None)]
    );
}

#[tokio::test(start_paused = true)]
async fn no_hedge_when_the_first_answers_in_time_the_budget_is_empty_or_a_sequence_asks() {
    let ms = Duration::from_millis;
    let fake = hedging(&[("w1", vec![Act::Slow(ms(5))]), ("w2", vec![])], ms(10));
    let resp = forward(&fake, &generous().retries(), &req(), "", None)
        .await
        .unwrap();
    assert_eq!(resp.id, "w1");
    assert_eq!(*fake.attempted.lock().unwrap(), ["w1"]);

    let empty = Env::new(Budget::new(Duration::from_secs(10), 0, 0.0));
    let fake = hedging(&[("w1", vec![Act::Slow(ms(50))]), ("w2", vec![])], ms(10));
    let resp = forward(&fake, &empty.retries(), &req(), "", None)
        .await
        .unwrap();
    assert_eq!(resp.id, "w1");
    assert_eq!(*fake.attempted.lock().unwrap(), ["w1"]);

    let fake = hedging(&[("w1", vec![Act::Slow(ms(50))]), ("w2", vec![])], ms(10));
    let mut sequence = infermesh_proto::ModelInferRequest {
        model_name: "m".into(),
        ..Default::default()
    };
    sequence.parameters.insert(
        "sequence_id".into(),
        infermesh_proto::InferParameter {
            parameter_choice: Some(
                infermesh_proto::infer_parameter::ParameterChoice::Int64Param(7),
            ),
        },
    );
    let sequence =
        Arc::new(RawRequest::decode(prost::Message::encode_to_vec(&sequence).into()).unwrap());
    let resp = forward(&fake, &generous().retries(), &sequence, "", None)
        .await
        .unwrap();
    assert_eq!(resp.id, "w1");
    assert_eq!(*fake.attempted.lock().unwrap(), ["w1"]);
    assert_eq!(counts(&fake), (0, 0, 0, 0));
}
