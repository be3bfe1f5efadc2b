//! Tenants' concurrency caps at the gateway: over its cap a tenant is refused at once while
//! another tenant is served, and both are counted per tenant.

use infermesh_proto::{ModelInferRequest, ServerReadyRequest};
use infermesh_tests::{is_ready, metric_at, poll_until, repo::*, tensors::*, Gateway, Worker};
use tonic::{Code, Request};

fn ident(id: &str) -> ModelInferRequest {
    let mut r = request("gate", vec![raw("INPUT0", "FP32", &[4], f32s(&[1.0; 4]))]);
    r.id = id.into();
    r
}

fn with_token(token: &str, req: ModelInferRequest) -> Request<ModelInferRequest> {
    let mut r = Request::new(req);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn over_its_concurrency_cap_a_tenant_is_refused_at_once_and_another_is_served() {
    let repo = Repo::new().identity("gate", &identity_config(&delay_ms(1000), "[ 4 ]"));
    let w = Worker::start(repo.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.yaml");
    std::fs::write(
        &file,
        format!(
            "tenants:\n  - name: capped\n    keys: [\"{}\"]\n    scopes: [infer]\n    models: [\"*\"]\n    limits: {{max_concurrent: 1}}\n  - name: free\n    keys: [\"{}\"]\n    scopes: [infer]\n    models: [\"*\"]\n    limits: {{}}\n",
            infermesh_core::auth::hash_key("k-capped"),
            infermesh_core::auth::hash_key("k-free"),
        ),
    )
    .unwrap();
    let gw = Gateway::spawn_at(&[w.addr], &["--auth-config", file.to_str().unwrap()]).await;
    let client = gw.client().await;
    poll_until("the gateway", || async {
        let mut ready = Request::new(ServerReadyRequest {});
        ready
            .metadata_mut()
            .insert("authorization", "Bearer k-free".parse().unwrap());
        is_ready(&mut client.clone(), ready).await
    })
    .await;

    let mut c = client.clone();
    let first =
        tokio::spawn(async move { c.model_infer(with_token("k-capped", ident("a"))).await });
    w.wait_metric(
        r#"infermesh_instances_busy{model="gate",version="1"}"#,
        |v| v == 1.0,
    )
    .await;
    let err = client
        .clone()
        .model_infer(with_token("k-capped", ident("b")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_concurrent"), "{err:?}");
    let free = client
        .clone()
        .model_infer(with_token("k-free", ident("c")))
        .await
        .unwrap();
    assert_eq!(free.into_inner().id, "c");
    assert_eq!(first.await.unwrap().unwrap().into_inner().id, "a");

    let at = gw.metrics_addr;
    assert_eq!(
        metric_at(
            at,
            r#"infermesh_auth_denied_total{tenant="capped",reason="concurrency"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric_at(
            at,
            r#"infermesh_tenant_requests_total{tenant="capped",code="Ok"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric_at(
            at,
            r#"infermesh_tenant_requests_total{tenant="free",code="Ok"}"#
        )
        .await,
        Some(1.0)
    );
    gw.stop().await.unwrap();
    w.stop().await.unwrap();
}
