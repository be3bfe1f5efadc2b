//! Every failure carries a machine-readable reason beside its code: in the status details
//! (`google.rpc.ErrorInfo`, domain `infermesh`) of unary calls, in the `infermesh_reason`
//! parameter of stream messages; the gateway passes a worker's reason on unchanged.

use futures::StreamExt;
use infermesh_core::{reason, Reason};
use infermesh_proto::{infer_parameter::ParameterChoice, ModelInferRequest};
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

/// (request, code, reason) for the failures a client can cause on purpose.
fn cases() -> Vec<(ModelInferRequest, Code, Reason)> {
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
        (
            echo("echo", "", &[5]),
            Code::InvalidArgument,
            Reason::Invalid,
        ),
    ]
}

#[tokio::test]
async fn unary_and_stream_failures_carry_their_reason_through_the_gateway() {
    let repo = Repo::new().identity("echo", &identity_config("", "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let gw = Gateway::start(&[&worker], &[]).await;
    for (server, url) in [("worker", worker.url()), ("gateway", gw.url())] {
        let mut client = infermesh_tests::client(&url).await;
        for (req, code, want) in cases() {
            let err = client.model_infer(req).await.unwrap_err();
            assert_eq!(err.code(), code, "{server}: {err:?}");
            assert_eq!(reason::of_status(&err), Some(want), "{server}: {err:?}");
        }
        let msgs: Vec<_> = cases().into_iter().map(|c| c.0).collect();
        let mut answers = client
            .model_stream_infer(futures::stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        for (_, code, want) in cases() {
            let msg = answers.next().await.unwrap().unwrap();
            assert!(!msg.error_message.is_empty(), "{server}");
            let params = msg.infer_response.unwrap().parameters;
            let got = |key: &str| params.get(key).and_then(|p| p.parameter_choice.clone());
            assert_eq!(
                got(reason::PARAM),
                Some(ParameterChoice::StringParam(want.as_str().into())),
                "{server}"
            );
            assert_eq!(
                got(infermesh_core::stream::STATUS_CODE),
                Some(ParameterChoice::Int64Param(code as i64)),
                "{server}"
            );
        }
    }
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}
