//! Client-controlled deadlines that once panicked the worker and the gateway: a
//! `grpc-timeout` of 19–20 digits ("overflow when adding duration to instant") and a Triton
//! `timeout` parameter of i64::MAX µs. They are ignored or clamped; the request is served.

use infermesh_proto::{infer_parameter::ParameterChoice, InferParameter};
use infermesh_tests::{repo, tensors::*, Gateway, Worker};
use tonic::{Code, Request};

fn echo() -> infermesh_proto::ModelInferRequest {
    request(
        "echo",
        vec![raw("INPUT0", "FP32", &[1, 2], f32s(&[1.0, 2.0]))],
    )
}

#[tokio::test]
async fn huge_deadlines_are_served_not_panicked_on() {
    let repo =
        repo::Repo::new().identity("echo", &repo::identity_config("max_batch_size: 8", "[ 2 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let gateway = Gateway::start(&[&worker], &[]).await;
    for url in [worker.url(), gateway.url()] {
        let mut c = infermesh_tests::client(&url).await;
        for header in [
            "18446744073709551615S",
            "99999999999999999999H",
            "99999999H",
            "123456789S",
            "abc",
            "1S",
        ] {
            let mut req = Request::new(echo());
            req.metadata_mut()
                .insert("grpc-timeout", header.parse().unwrap());
            let resp = c.model_infer(req).await;
            assert!(resp.is_ok(), "{url} grpc-timeout {header}: {resp:?}");
        }
        for timeout in [i64::MAX, i64::MIN, -1] {
            let mut req = echo();
            req.parameters.insert(
                "timeout".into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(timeout)),
                },
            );
            let resp = c.model_infer(req).await;
            assert!(resp.is_ok(), "{url} timeout {timeout}: {resp:?}");
        }
        let mut req = echo();
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Uint64Param(u64::MAX)),
            },
        );
        assert!(c.model_infer(req).await.is_ok(), "{url} timeout u64::MAX");
        // A real deadline still holds. Whichever notices first answers: our handler
        // (DEADLINE_EXCEEDED) or tonic's own timer, which says CANCELLED and sits outside
        // every layer a server can add.
        let mut req = Request::new(echo());
        req.metadata_mut()
            .insert("grpc-timeout", "1n".parse().unwrap());
        let code = c.model_infer(req).await.unwrap_err().code();
        assert!(
            matches!(code, Code::DeadlineExceeded | Code::Cancelled),
            "{url}: {code:?}"
        );
    }
    gateway.stop().await.unwrap();
    worker.stop().await.unwrap();
}
