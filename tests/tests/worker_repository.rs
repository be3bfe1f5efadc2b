//! Triton model repositories: config.pbtxt or none, versions, broken models, model control
//! (explicit and poll), and the identity backend.

use std::time::Duration;

use infermesh_proto::{
    ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest, RepositoryIndexRequest,
    RepositoryModelLoadRequest, RepositoryModelUnloadRequest,
};
use infermesh_tests::{repo::*, tensors::*, Client, Worker};
use tonic::Code;

/// RepositoryIndex as (name, version, state, reason) rows.
type Index = Vec<(String, String, String, String)>;

async fn index(client: &mut Client) -> Index {
    let r = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    r.models
        .into_iter()
        .map(|m| (m.name, m.version, m.state, m.reason))
        .collect()
}

fn digits(model: &str, version: &str) -> infermesh_proto::ModelInferRequest {
    let (rows, _) = digits_samples();
    let mut r = request(model, vec![raw("input", "FP32", &[1, 64], f32s(&rows[0]))]);
    r.model_version = version.into();
    r
}

/// Two callers asking `digits` for version "" until `stop`; each panics on a failed
/// request and returns how many it sent.
fn digits_load(
    client: &Client,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..2)
        .map(|_| {
            let (mut c, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !*stop.borrow() {
                    c.model_infer(digits("digits", ""))
                        .await
                        .expect("no request fails during a bad update");
                    n += 1;
                }
                n
            })
        })
        .collect()
}

/// A worker rescanning `repo` every 100 ms.
async fn polling(repo: &Repo) -> Worker {
    Worker::start(
        repo.path(),
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "0.1",
        ],
    )
    .await
}

fn load(name: &str) -> RepositoryModelLoadRequest {
    RepositoryModelLoadRequest {
        model_name: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_mixed_repository_serves_what_it_can_and_reports_the_rest() {
    let repo = Repo::new()
        .onnx(
            "configured",
            "digits",
            r#"platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "input" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "label" data_type: TYPE_INT64 dims: [ ] }, { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]"#,
        )
        .onnx("derived", "digits", "")
        .onnx("two_versions", "digits", "version_policy: { all { } }")
        .version("two_versions", 2, "digits")
        .onnx(
            "broken",
            "digits",
            r#"max_batch_size: 4
input [ { name: "input" data_type: TYPE_FP32 dims: [ 65 ] } ]"#,
        );
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;

    let idx = index(&mut client).await;
    let state = |name: &str, v: &str| {
        idx.iter()
            .find(|m| m.0 == name && m.1 == v)
            .cloned()
            .unwrap()
    };
    assert_eq!(state("configured", "1").2, "READY");
    assert_eq!(state("derived", "1").2, "READY");
    assert_eq!(state("two_versions", "1").2, "READY");
    assert_eq!(state("two_versions", "2").2, "READY");
    let broken = state("broken", "1");
    assert_eq!(broken.2, "UNAVAILABLE");
    assert!(
        broken.3.contains("input[0] 'input'") && broken.3.contains("[65]"),
        "{}",
        broken.3
    );

    // ModelConfig answers what the file says.
    let config = client
        .model_config(ModelConfigRequest {
            name: "configured".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 4);
    assert_eq!(config.input[0].dims, [64]);
    assert_eq!(config.instance_group[0].count, 2);
    client
        .model_infer(digits("configured", ""))
        .await
        .expect("configured serves");
    let mut five = digits("configured", "");
    five.inputs[0].shape = vec![5, 64];
    five.raw_input_contents[0] = f32s(&[0.0; 320]);
    let err = client.model_infer(five).await.unwrap_err();
    assert!(
        err.message().contains("max_batch_size"),
        "{}",
        err.message()
    );

    // Versions: "" is the newest; each version answers as itself.
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "two_versions".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["2"]);
    for v in ["1", "2", ""] {
        let r = client
            .model_infer(digits("two_versions", v))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.model_version, if v.is_empty() { "2" } else { v });
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn explicit_model_control_loads_and_unloads_on_request() {
    let repo = Repo::new().onnx("a", "digits", "").onnx("b", "digits", "");
    let worker = Worker::start(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "a"],
    )
    .await;
    let mut client = worker.client().await;
    let ready = |n: &str| ModelReadyRequest {
        name: n.into(),
        version: String::new(),
    };
    assert!(
        client
            .model_ready(ready("a"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("b"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let b = index(&mut client)
        .await
        .into_iter()
        .find(|m| m.0 == "b")
        .unwrap();
    assert_eq!(
        (b.2.as_str(), b.3.as_str()),
        ("UNAVAILABLE", "unloaded"),
        "listed, not loaded"
    );

    client.repository_model_load(load("b")).await.unwrap();
    client.model_infer(digits("b", "")).await.unwrap();
    client
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = client.model_infer(digits("a", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("unloaded"), "{}", err.message());

    let err = client
        .repository_model_load(load("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    std::fs::write(repo.path().join("b/config.pbtxt"), "max_batch_size: -3").unwrap();
    let err = client.repository_model_load(load("b")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_batch_size"),
        "{}",
        err.message()
    );
    worker.stop().await.unwrap();

    let worker = Worker::start(repo.path(), &[]).await;
    let err = worker
        .client()
        .await
        .repository_model_load(load("a"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "mode none refuses Load"
    );
    worker.stop().await.unwrap();
}

/// Poll mode: a version added while requests run is picked up, the old one drains, and
/// no request fails.
#[tokio::test]
async fn poll_mode_picks_up_a_new_version_without_failing_requests() {
    let config = identity_config(&delay_ms(5), "[ 4 ]");
    let repo = Repo::new().identity("p", &config);
    let worker = polling(&repo).await;
    let client = worker.client().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = (0..4).map(|_| {
        let (mut c, stop) = (client.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut versions = Vec::new();
            while !*stop.borrow() {
                let r = c
                    .model_infer(request(
                        "p",
                        vec![raw("INPUT0", "FP32", &[4], f32s(&[2.0; 4]))],
                    ))
                    .await;
                versions.push(
                    r.expect("no request fails during the rollout")
                        .into_inner()
                        .model_version,
                );
            }
            versions
        })
    });
    let load: Vec<_> = load.collect();
    std::fs::create_dir_all(repo.path().join("p/2")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut c = client.clone();
    loop {
        let r = c
            .model_ready(ModelReadyRequest {
                name: "p".into(),
                version: "2".into(),
            })
            .await
            .unwrap();
        if r.into_inner().ready {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "version 2 never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keep the load going until some request was answered by version 2.
    let mut probe = client.clone();
    loop {
        let r = probe
            .model_infer(request(
                "p",
                vec![raw("INPUT0", "FP32", &[4], f32s(&[2.0; 4]))],
            ))
            .await
            .unwrap();
        if r.into_inner().model_version == "2" {
            break;
        }
    }
    stop_tx.send(true).unwrap();
    let mut all = Vec::new();
    for l in load {
        all.extend(l.await.unwrap());
    }
    assert!(
        all.iter().any(|v| v == "1"),
        "version 1 served before the rollout"
    );
    let v1 = index(&mut c)
        .await
        .into_iter()
        .find(|m| m.0 == "p" && m.1 == "1")
        .unwrap();
    assert_eq!(v1.2, "UNAVAILABLE", "version 1 left once version 2 was in");
    worker.stop().await.unwrap();
}

/// The identity backend echoes, delays and fails on request; injected failures are
/// INTERNAL, exactly floor(n × failure_rate) of n runs.
#[tokio::test]
async fn identity_backend_echoes_and_fails_as_configured() {
    let config = identity_config(
        r#"parameters { key: "failure_rate" value: { string_value: "0.5" } }"#,
        "[ 3 ]",
    );
    let repo = Repo::new().identity("flaky", &config);
    let worker = Worker::start(repo.path(), &[]).await;
    let mut client = worker.client().await;
    let mut failures = 0;
    for _ in 0..10 {
        match client
            .model_infer(request(
                "flaky",
                vec![raw("INPUT0", "FP32", &[3], f32s(&[1.0, 2.0, 3.0]))],
            ))
            .await
        {
            Ok(r) => assert_eq!(read_f32(output(r.get_ref(), "OUTPUT0")), [1.0, 2.0, 3.0]),
            Err(e) => {
                assert_eq!(e.code(), Code::Internal);
                assert!(e.message().contains("injected failure"), "{}", e.message());
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 5);
    worker.stop().await.unwrap();
}

/// Poll mode: a corrupt new version (half a model file) and then a config that does not
/// parse never take the serving version down; no request fails, the failure is in
/// RepositoryIndex; a good new version takes over once READY, and the old one leaves then.
#[tokio::test]
async fn a_bad_update_never_takes_the_serving_version_down() {
    let repo = Repo::new().onnx("digits", "digits", "");
    let worker = polling(&repo).await;
    let client = worker.client().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = digits_load(&client, &stop_rx);
    let mut c = client.clone();
    let wait_for = |what: &'static str, want: Box<dyn Fn(&Index) -> bool>| {
        let mut c = client.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let now = index(&mut c).await;
                if want(&now) {
                    return now;
                }
                assert!(tokio::time::Instant::now() < deadline, "{what}: {now:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let state = |idx: &Index, v: &str| {
        idx.iter()
            .find(|m| m.0 == "digits" && m.1 == v)
            .map(|m| m.2.clone())
    };

    // Half a model file, as a slow copy leaves it.
    let model = std::fs::read(infermesh_tests::models().join("digits/1/model.onnx")).unwrap();
    std::fs::create_dir_all(repo.path().join("digits/2")).unwrap();
    std::fs::write(
        repo.path().join("digits/2/model.onnx"),
        &model[..model.len() / 2],
    )
    .unwrap();
    let idx = wait_for(
        "version 2 tried",
        Box::new(move |i| state(i, "2").as_deref() == Some("UNAVAILABLE")),
    )
    .await;
    assert_eq!(state(&idx, "1").as_deref(), Some("READY"), "{idx:?}");

    // A config that does not parse: the serving version stays, the reason is listed.
    std::fs::write(repo.path().join("digits/config.pbtxt"), "max_batch_size: [").unwrap();
    let idx = wait_for(
        "the config failure reported",
        Box::new(move |i| {
            i.iter()
                .any(|m| m.0 == "digits" && m.1.is_empty() && m.3.contains("stay in service"))
        }),
    )
    .await;
    assert_eq!(state(&idx, "1").as_deref(), Some("READY"), "{idx:?}");
    std::fs::remove_file(repo.path().join("digits/config.pbtxt")).unwrap();

    // A good version 3: it takes over once READY, and version 1 leaves then.
    std::fs::create_dir_all(repo.path().join("digits/3")).unwrap();
    std::fs::write(repo.path().join("digits/3/model.onnx"), &model).unwrap();
    let idx = wait_for(
        "version 3 in, version 1 out",
        Box::new(move |i| {
            state(i, "3").as_deref() == Some("READY")
                && state(i, "1").as_deref() == Some("UNAVAILABLE")
        }),
    )
    .await;
    assert!(
        idx.iter().all(|m| m.0 != "digits" || !m.1.is_empty()),
        "the failure entry is gone: {idx:?}"
    );
    stop_tx.send(true).unwrap();
    let mut served = 0;
    for l in load {
        served += l.await.unwrap();
    }
    assert!(served > 0);
    let r = c
        .model_infer(digits("digits", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, "3");
    worker.stop().await.unwrap();
}

/// Config fields that would change answers are refused by name at load; a speed-only one
/// (response_cache) loads, with a warning.
#[tokio::test]
async fn config_fields_that_would_change_answers_are_refused_by_name() {
    let repo = Repo::new()
        .identity(
            "seq",
            &identity_config("sequence_batching { iterative_sequence: true }", "[ 4 ]"),
        )
        .identity(
            "limited",
            &identity_config(
                "instance_group [ { count: 1 rate_limiter { resources [ { name: \"r\" count: 1 } ] } } ]",
                "[ 4 ]",
            ),
        )
        .identity("cached", &identity_config("response_cache { enable: true }", "[ 4 ]"));
    let worker = Worker::start(repo.path(), &[]).await;
    let mut c = worker.client().await;
    let idx = index(&mut c).await;
    let row = |name: &str| idx.iter().find(|m| m.0 == name).cloned().unwrap();
    let seq = row("seq");
    assert_eq!(seq.2, "UNAVAILABLE");
    assert!(
        seq.3
            .contains("sequence_batching.iterative_sequence: not supported"),
        "{seq:?}"
    );
    let limited = row("limited");
    assert!(
        limited.3.contains("instance_group[0].rate_limiter"),
        "{limited:?}"
    );
    assert_eq!(row("cached").2, "READY");
    worker.stop().await.unwrap();
}

/// model_warmup runs each sample `count` times on every instance before READY (counted);
/// a sample that cannot run fails the load with its reason.
#[tokio::test]
async fn model_warmup_runs_before_ready_and_a_failing_sample_fails_the_load() {
    let warm = r#"instance_group [ { count: 2 kind: KIND_CPU } ]
model_warmup [
  { name: "zeros" batch_size: 1 count: 3 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } },
  { name: "noise" batch_size: 1 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } },
  { name: "file" batch_size: 1 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "four_floats" } } }
]"#;
    let missing = r#"model_warmup [ { name: "gone" batch_size: 1 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "nope" } } } ]"#;
    let repo = Repo::new()
        .identity("warm", &identity_config(warm, "[ 4 ]"))
        .identity("cold", &identity_config(missing, "[ 4 ]"));
    std::fs::create_dir_all(repo.path().join("warm/warmup")).unwrap();
    std::fs::write(repo.path().join("warm/warmup/four_floats"), [0u8; 16]).unwrap();
    let worker = Worker::start(repo.path(), &[]).await;
    // 2 instances × (3 + 1 + 1) runs.
    assert_eq!(
        worker
            .metric("infermesh_warmup_runs_total{model=\"warm\",version=\"1\"}")
            .await,
        Some(10.0)
    );
    let mut c = worker.client().await;
    let idx = index(&mut c).await;
    let cold = idx.iter().find(|m| m.0 == "cold").unwrap();
    assert_eq!(cold.2, "UNAVAILABLE");
    assert!(
        cold.3.contains("model_warmup[0] 'gone'") && cold.3.contains("cannot read"),
        "{cold:?}"
    );
    worker.stop().await.unwrap();
}

/// Explicit mode: a Load that finds a corrupt new version answers its failure, and the
/// version that was serving stays in service.
#[tokio::test]
async fn an_explicit_load_of_a_corrupt_version_keeps_the_serving_one() {
    let repo = Repo::new().onnx("digits", "digits", "");
    let worker = Worker::start(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "*"],
    )
    .await;
    let mut c = worker.client().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let callers = digits_load(&c, &stop_rx);
    let model = std::fs::read(infermesh_tests::models().join("digits/1/model.onnx")).unwrap();
    std::fs::create_dir_all(repo.path().join("digits/2")).unwrap();
    std::fs::write(
        repo.path().join("digits/2/model.onnx"),
        &model[..model.len() / 3],
    )
    .unwrap();
    let err = c.repository_model_load(load("digits")).await.unwrap_err();
    assert!(err.message().contains("model.onnx"), "{err:?}");
    stop_tx.send(true).unwrap();
    for l in callers {
        assert!(
            l.await.unwrap() > 0,
            "requests were served while the Load failed"
        );
    }
    let r = c
        .model_infer(digits("digits", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, "1", "version 1 still serves");
    let idx = index(&mut c).await;
    assert!(
        idx.iter()
            .any(|m| m.0 == "digits" && m.1 == "1" && m.2 == "READY"),
        "{idx:?}"
    );
    worker.stop().await.unwrap();
}
