//! Malformed requests get the right status and a message naming the input, what was
//! expected and what came; the server keeps serving, and a concurrent good request is
//! unharmed.

use bytes::Bytes;
use infermesh_proto::{InferTensorContents, ModelInferRequest};
use infermesh_tests::{models, tensors::*, Worker};
use tonic::Code;

fn mlp_input(
    rows: i64,
) -> (
    infermesh_proto::model_infer_request::InferInputTensor,
    Bytes,
) {
    raw(
        "input",
        "FP32",
        &[rows, 784],
        f32s(&vec![0.5; rows as usize * 784]),
    )
}

fn good() -> ModelInferRequest {
    request("mlp", vec![mlp_input(1)])
}

/// (what, request, expected code, substrings the message must contain)
fn cases() -> Vec<(&'static str, ModelInferRequest, Code, Vec<&'static str>)> {
    let mut typed_and_raw = good();
    typed_and_raw.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: vec![0.0; 784],
        ..Default::default()
    });
    let mut typed_count = good();
    typed_count.raw_input_contents.clear();
    typed_count.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: vec![0.0; 700],
        ..Default::default()
    });
    let mut unknown_version = good();
    unknown_version.model_version = "7".into();
    // multi_io with its BYTES input `text` ([3, 1]) carrying `data`; the rest well formed.
    let text_input = |data: Bytes| {
        request(
            "multi_io",
            vec![
                raw("text", "BYTES", &[3, 1], data),
                raw("x", "FP32", &[3, 4], f32s(&[0.0; 12])),
                raw("k", "INT32", &[3, 1], vec![0u8; 12]),
                raw("h", "FP16", &[3, 2], vec![0u8; 12]),
            ],
        )
    };
    let mut overlong = strings(&[b"a", b"b", b"c"]).to_vec();
    overlong[5] = 90; // second element claims 90 bytes
    vec![
        (
            "wrong datatype",
            request(
                "mlp",
                vec![raw("input", "FP64", &[1, 784], vec![0u8; 784 * 8])],
            ),
            Code::InvalidArgument,
            vec!["input 'input'", "datatype 'FP64'", "expected FP32"],
        ),
        (
            "wrong rank",
            request("mlp", vec![raw("input", "FP32", &[784], f32s(&[0.0; 784]))]),
            Code::InvalidArgument,
            vec!["input 'input'", "rank 1", "expected rank 2"],
        ),
        (
            "wrong dim",
            request(
                "mlp",
                vec![raw("input", "FP32", &[1, 783], f32s(&[0.0; 783]))],
            ),
            Code::InvalidArgument,
            vec!["input 'input'", "dim 1 is 783", "expected 784"],
        ),
        (
            "batch too large",
            request("mlp", vec![mlp_input(9)]),
            Code::InvalidArgument,
            vec!["input 'input'", "batch size 9", "max_batch_size"],
        ),
        (
            "raw size mismatch",
            request("mlp", vec![raw("input", "FP32", &[1, 784], vec![0u8; 100])]),
            Code::InvalidArgument,
            vec!["input 'input'", "100 bytes", "expected 3136"],
        ),
        (
            "raw and typed mixed",
            typed_and_raw,
            Code::InvalidArgument,
            vec![
                "input 'input'",
                "both raw_input_contents and typed contents",
            ],
        ),
        (
            "typed count mismatch",
            typed_count,
            Code::InvalidArgument,
            vec![
                "input 'input'",
                "fp32_contents has 700 elements",
                "expected 784",
            ],
        ),
        (
            "missing input",
            request("multi_io", vec![raw("x", "FP32", &[1, 4], f32s(&[0.0; 4]))]),
            Code::InvalidArgument,
            vec!["missing input", "text"],
        ),
        (
            "unknown input",
            request(
                "mlp",
                vec![mlp_input(1), raw("extra", "FP32", &[1], f32s(&[0.0]))],
            ),
            Code::InvalidArgument,
            vec!["unknown input 'extra'", "input FP32 [-1, 784]"],
        ),
        (
            "truncated BYTES prefix",
            text_input(strings(&[b"a", b"b", b"c"]).slice(..11)),
            Code::InvalidArgument,
            vec!["input 'text'", "element 2", "length prefix"],
        ),
        (
            "overlong BYTES length",
            text_input(overlong.into()),
            Code::InvalidArgument,
            vec!["input 'text'", "element 1 declares 90 bytes"],
        ),
        (
            "unknown model",
            request("nope", vec![mlp_input(1)]),
            Code::NotFound,
            vec!["unknown model 'nope'", "mlp"],
        ),
        (
            "unknown version",
            unknown_version,
            Code::NotFound,
            vec!["model 'mlp' has no version 7", "versions: 1"],
        ),
        (
            "empty request",
            request("mlp", vec![]),
            Code::InvalidArgument,
            vec!["no inputs", "input FP32 [-1, 784]"],
        ),
        (
            "unknown datatype",
            request(
                "mlp",
                vec![raw("input", "FLOAT32", &[1, 784], f32s(&[0.0; 784]))],
            ),
            Code::InvalidArgument,
            vec!["input 'input'", "unknown datatype 'FLOAT32'"],
        ),
        (
            "unknown output",
            ask_outputs(good(), &["logits"]),
            Code::InvalidArgument,
            vec!["unknown output 'logits'", "output"],
        ),
    ]
}

#[tokio::test]
async fn every_malformed_request_gets_its_status_and_a_clear_message() {
    let worker = Worker::start(&models(), &[]).await;
    let mut client = worker.client().await;
    for (what, req, code, needles) in cases() {
        // A good request runs concurrently with each bad one and must be unharmed.
        let mut other = client.clone();
        let good = tokio::spawn(async move { other.model_infer(good()).await });
        let err = client.model_infer(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        for n in needles {
            assert!(
                err.message().contains(n),
                "{what}: message {:?} lacks {n:?}",
                err.message()
            );
        }
        let ok = good
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: good request failed: {e}"));
        assert_eq!(read_f32(output(ok.get_ref(), "output")).len(), 10);
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted_and_the_server_goes_on() {
    let worker = Worker::start(&models(), &["--grpc-max-message-bytes", "20000"]).await;
    let mut client = worker.client().await;
    let big = request("mlp", vec![mlp_input(8)]); // 25 KB of floats
    let err = client.model_infer(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    client
        .model_infer(good())
        .await
        .expect("small request still served");
    worker.stop().await.unwrap();
}
