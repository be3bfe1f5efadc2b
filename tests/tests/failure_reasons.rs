//! Every failure carries a machine-readable reason beside its code: in the status details
//! (`google.rpc.ErrorInfo`, domain `infermesh`) of unary calls, in the `infermesh_reason`
//! parameter of stream messages; the gateway passes a worker's reason on unchanged.

use futures::StreamExt;
use infermesh_core::{reason, Reason};
use infermesh_proto::{
    infer_parameter::ParameterChoice::{self, BoolParam, Int64Param},
    ModelInferRequest,
};
use infermesh_tests::{repo::*, tensors::*, Gateway, Worker};
use tonic::Code;

fn echo(model: &str, version: &str, dims: &[i64]) -> ModelInferRequest {
    let n = dims.iter().product::<i64>() as usize;
    let mut r = request(
        model,
        vec![raw("INPUT0", "FP32", dims, f32s(&vec![1.0; n]))],
    );
    r.model_version = version.into();
    r
}

type Case = (ModelInferRequest, Code, Reason);

/// A model, and a version of it, that nobody serves.
fn not_found() -> Vec<Case> {
    vec![
        (
            echo("nope", "", &[4]),
            Code::NotFound,
            Reason::ModelNotFound,
        ),
        (
            echo("echo", "9", &[4]),
            Code::NotFound,
            Reason::VersionNotFound,
        ),
    ]
}

/// (request, code, reason) for the failures a client can cause on purpose.
fn cases() -> Vec<Case> {
    let mut cases = not_found();
    cases.push((
        echo("echo", "", &[5]),
        Code::InvalidArgument,
        Reason::Invalid,
    ));
    cases
}

/// Each case as a unary call, then all of them as messages of one stream: each failure
/// has its code and its reason (status details unary, parameters on the stream).
async fn assert_reasons(client: &mut infermesh_tests::Client, cases: &[Case], server: &str) {
    for (req, code, want) in cases {
        let err = client.model_infer(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), *code, "{server}: {err:?}");
        assert_eq!(reason::of_status(&err), Some(*want), "{server}: {err:?}");
    }
    let msgs: Vec<_> = cases.iter().map(|c| c.0.clone()).collect();
    let mut answers = client
        .model_stream_infer(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    for (_, code, want) in cases {
        let msg = answers.next().await.unwrap().unwrap();
        assert!(!msg.error_message.is_empty(), "{server}");
        let params = msg.infer_response.unwrap().parameters;
        let got = |key: &str| params.get(key).and_then(|p| p.parameter_choice.clone());
        assert_eq!(
            got(reason::PARAM),
            Some(ParameterChoice::StringParam(want.as_str().into())),
            "{server}: {}",
            msg.error_message
        );
        assert_eq!(
            got(infermesh_core::stream::STATUS_CODE),
            Some(ParameterChoice::Int64Param(*code as i64)),
            "{server}: {}",
            msg.error_message
        );
    }
}

#[tokio::test]
async fn unary_and_stream_failures_carry_their_reason_through_the_gateway() {
    let repo = Repo::new().identity("echo", &identity_config("", "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let gw = Gateway::start(&[&worker], &[]).await;
    for (server, url) in [("worker", worker.url()), ("gateway", gw.url())] {
        let mut client = infermesh_tests::client(&url).await;
        assert_reasons(&mut client, &cases(), server).await;
    }
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}

/// The failures the gateway makes itself carry their reason as well: a deadline from
/// Triton's `timeout` parameter (no gRPC deadline, so the answer is the server's, not the
/// client's own timer) and a tenant over its rate, unary and on a stream.
#[tokio::test]
async fn the_gateway_s_own_failures_carry_their_reason() {
    let repo = Repo::new()
        .identity("slow", &identity_config(&delay_ms(2000), "[ 4 ]"))
        .identity("echo", &identity_config("", "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = "{requests_per_second: 1, small_calls_per_second: 1000}";
    let auth = infermesh_tests::one_tenant(dir.path(), r#"["*"]"#, limits);
    let gw = Gateway::spawn_at(&[worker.addr], &["--auth-config", auth.to_str().unwrap()]).await;
    let mut client = gw.client().await;
    infermesh_tests::poll_until("the gateway", || async {
        let ready = signed(infermesh_proto::ServerReadyRequest {});
        infermesh_tests::is_ready(&mut client.clone(), ready).await
    })
    .await;
    let timed = || with_param(echo("slow", "", &[4]), "timeout", Int64Param(100_000));

    // One request a second: the first is served or times out, the next is over quota.
    let first = client.model_infer(signed(timed())).await.unwrap_err();
    assert_eq!(first.code(), Code::DeadlineExceeded, "{first:?}");
    assert_eq!(
        reason::of_status(&first),
        Some(Reason::Deadline),
        "{first:?}"
    );
    let over = client
        .model_infer(signed(echo("echo", "", &[4])))
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(
        reason::of_status(&over),
        Some(Reason::OverQuota),
        "{over:?}"
    );

    let msgs = futures::stream::iter(vec![echo("echo", "", &[4])]);
    let mut answers = client
        .model_stream_infer(signed(msgs))
        .await
        .unwrap()
        .into_inner();
    let msg = answers.next().await.unwrap().unwrap();
    let params = msg.infer_response.unwrap().parameters;
    assert_eq!(
        params
            .get(reason::PARAM)
            .and_then(|p| p.parameter_choice.clone()),
        Some(ParameterChoice::StringParam("over-quota".into())),
        "{}",
        msg.error_message
    );
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}

/// A request with the test tenant's key.
fn signed<S>(s: S) -> tonic::Request<S> {
    let mut r = tonic::Request::new(s);
    r.metadata_mut()
        .insert("authorization", "Bearer k".parse().unwrap());
    r
}

/// Every failure the gateway makes itself, unary and as a stream message, with its code
/// and reason (quarantine is in test_hostile.py: it needs workers that really crash).
#[tokio::test]
async fn every_failure_the_gateway_makes_has_its_code_and_reason() {
    let repo = Repo::new()
        .identity("slow", &identity_config(&delay_ms(1000), "[ 4 ]"))
        .identity("echo", &identity_config("", "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let gw = Gateway::start(&[&worker], &[]).await;
    let reserved = with_param(echo("echo", "", &[4]), "infermesh_cancel", BoolParam(true));
    let timed = with_param(echo("slow", "", &[4]), "timeout", Int64Param(100_000));
    let bad_version = echo("echo", "x", &[4]);
    let mut cases = vec![
        (reserved, Code::InvalidArgument, Reason::Invalid),
        (bad_version, Code::InvalidArgument, Reason::Invalid),
    ];
    cases.extend(not_found());
    cases.push((timed, Code::DeadlineExceeded, Reason::Deadline));
    let mut client = infermesh_tests::client(&gw.url()).await;
    assert_reasons(&mut client, &cases, "gateway").await;
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}
