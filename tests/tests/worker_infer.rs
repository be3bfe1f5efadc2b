//! Inference through a real worker on loopback: real ONNX Runtime, bundled models.

use infermesh_proto::{ModelConfigRequest, ModelMetadataRequest, ServerMetadataRequest};
use infermesh_tests::{models, tensors::*, Worker};

#[tokio::test]
async fn digits_classifier_predicts_the_expected_labels() {
    let worker = Worker::start(&models(), &[]).await;
    let mut client = worker.client().await;
    let (rows, labels) = digits_samples();
    let flat: Vec<f32> = rows.iter().take(8).flatten().copied().collect();
    let req = request("digits", vec![raw("input", "FP32", &[8, 64], f32s(&flat))]);
    let resp = client.model_infer(req).await.unwrap().into_inner();
    assert_eq!(resp.model_name, "digits");
    assert_eq!(read_i64(output(&resp, "label")), labels[..8]);
    let probs = read_f32(output(&resp, "probabilities"));
    assert_eq!(probs.len(), 80);
    for row in probs.chunks(10) {
        assert!(
            (row.iter().sum::<f32>() - 1.0).abs() < 1e-4,
            "probabilities sum to 1: {row:?}"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn metadata_and_config_describe_the_graph() {
    let worker = Worker::start(&models(), &[]).await;
    let mut client = worker.client().await;
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    assert_eq!(meta.platform, "onnxruntime_onnx");
    assert_eq!(
        (
            meta.inputs[0].name.as_str(),
            meta.inputs[0].datatype.as_str()
        ),
        ("input", "FP32")
    );
    assert_eq!(meta.inputs[0].shape, [-1, 784]);
    assert_eq!(meta.outputs[0].shape, [-1, 10]);

    let config = client
        .model_config(ModelConfigRequest {
            name: "mlp".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 8);
    assert_eq!(config.input[0].dims, [784]);
    assert_eq!(
        config.input[0].data_type,
        infermesh_proto::DataType::TypeFp32 as i32
    );
    assert_eq!(config.instance_group[0].count, 1);

    let server = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "infermesh");
    // Only what is implemented: perf_analyzer changes its behaviour by this list.
    assert_eq!(
        server.extensions,
        [
            "classification",
            "model_configuration",
            "model_repository",
            "sequence",
            "statistics"
        ]
    );
    worker.stop().await.unwrap();
}

/// Every datatype goes through ONNX Runtime (Identity) and comes back byte for byte.
#[tokio::test]
async fn every_datatype_round_trips_through_a_real_model() {
    let worker = Worker::start(&models(), &[]).await;
    let mut client = worker.client().await;
    let types = [
        ("bool", "BOOL", 1),
        ("uint8", "UINT8", 1),
        ("uint16", "UINT16", 2),
        ("uint32", "UINT32", 4),
        ("uint64", "UINT64", 8),
        ("int8", "INT8", 1),
        ("int16", "INT16", 2),
        ("int32", "INT32", 4),
        ("int64", "INT64", 8),
        ("fp16", "FP16", 2),
        ("bf16", "BF16", 2),
        ("fp32", "FP32", 4),
        ("fp64", "FP64", 8),
    ];
    let mut inputs = Vec::new();
    let mut expected = Vec::new();
    for (i, (name, dt, size)) in types.iter().enumerate() {
        // Two rows of three elements; bool bytes must be 0/1, others any pattern.
        let data: Vec<u8> = (0..6 * size)
            .map(|j| {
                if *dt == "BOOL" {
                    (j % 2) as u8
                } else {
                    (j * 7 + i) as u8
                }
            })
            .collect();
        expected.push((format!("out_{name}"), data.clone()));
        inputs.push(raw(&format!("in_{name}"), dt, &[2, 3], data));
    }
    let words: [&[u8]; 6] = [b"a", b"", b"\xce\xbb x", b"longer string", b"5", b"six"];
    inputs.push(raw("in_bytes", "BYTES", &[2, 3], strings(&words)));
    let resp = client
        .model_infer(request("all_types", inputs))
        .await
        .unwrap()
        .into_inner();
    for (name, data) in expected {
        assert_eq!(output(&resp, &name).as_ref(), &data[..], "{name}");
        let meta = resp.outputs.iter().find(|o| o.name == name).unwrap();
        assert_eq!(meta.shape, [2, 3], "{name}");
    }
    assert_eq!(output(&resp, "out_bytes"), &strings(&words));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn typed_contents_strings_fp16_and_output_subsets() {
    let worker = Worker::start(&models(), &[]).await;
    let mut client = worker.client().await;
    let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let h: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
        .iter()
        .flat_map(|&v| half(v))
        .collect();
    let mut req = request(
        "multi_io",
        vec![
            raw("text", "BYTES", &[2, 1], strings(&[b"hi", b"there"])),
            raw(
                "x",
                "FP32",
                &[2, 4],
                f32s(&[0., 1., 2., 3., 4., 5., 6., 7.]),
            ),
            raw(
                "k",
                "INT32",
                &[2, 1],
                vec![41u8, 0, 0, 0, 255, 255, 255, 255],
            ),
            raw("h", "FP16", &[2, 2], h),
        ],
    );
    let resp = client.model_infer(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        output(&resp, "text_twice"),
        &strings(&[b"hi", b"hi", b"there", b"there"])
    );
    assert_eq!(
        read_f32(output(&resp, "y")),
        [1., 3., 5., 7., 9., 11., 13., 15.]
    );
    assert_eq!(output(&resp, "k_plus").as_ref(), [42, 0, 0, 0, 0, 0, 0, 0]);
    let neg: Vec<u8> = [-1.5f32, 2.0, -0.25, -8.0]
        .iter()
        .flat_map(|&v| half(v))
        .collect();
    assert_eq!(output(&resp, "h_neg").as_ref(), &neg[..]);

    // The same request with typed contents for what has a typed field (FP16 has none).
    req.raw_input_contents.clear();
    for input in &mut req.inputs {
        let c = infermesh_proto::InferTensorContents::default();
        input.contents = Some(match input.name.as_str() {
            "text" => infermesh_proto::InferTensorContents {
                bytes_contents: vec!["hi".into(), "there".into()],
                ..c
            },
            "x" => infermesh_proto::InferTensorContents {
                fp32_contents: vec![0., 1., 2., 3., 4., 5., 6., 7.],
                ..c
            },
            "k" => infermesh_proto::InferTensorContents {
                int_contents: vec![41, -1],
                ..c
            },
            _ => c,
        });
    }
    req.inputs.retain(|i| i.name != "h");
    let err = client.model_infer(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("missing input 'h'"),
        "{}",
        err.message()
    );

    // Requested-output subset: only y comes back.
    let mut req = request(
        "multi_io",
        vec![
            raw("text", "BYTES", &[1, 1], strings(&[b"x"])),
            raw("x", "FP32", &[1, 4], f32s(&[1., 1., 1., 1.])),
            raw("k", "INT32", &[1, 1], vec![0u8; 4]),
            raw("h", "FP16", &[1, 2], vec![0u8; 4]),
        ],
    );
    req = ask_outputs(req, &["y"]);
    let resp = client.model_infer(req).await.unwrap().into_inner();
    assert_eq!(resp.outputs.len(), 1);
    assert_eq!(resp.raw_output_contents.len(), 1);
    assert_eq!(read_f32(output(&resp, "y")), [3., 3., 3., 3.]);
    worker.stop().await.unwrap();
}
