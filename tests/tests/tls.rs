//! TLS and mTLS on the gRPC port, gateway → worker mTLS, certificates rotated on disk,
//! and the plaintext health port beside a TLS port. Certificates are made here (rcgen).

use std::{path::Path, time::Duration};

use infermesh_proto::{ModelInferRequest, ServerReadyRequest};
use infermesh_tests::{
    client, models,
    pki::{Ca, Leaf},
    tensors::*,
    tls_client, Gateway, Worker,
};

/// ServerReady over TLS; a refused handshake or call is the error's text. (With TLS 1.3
/// a server refuses a client certificate after the client's side of the handshake has
/// finished, so the refusal may come with the first call.)
async fn ready(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&Leaf>,
    name: &str,
) -> Result<(), String> {
    let mut c = tls_client(addr, ca, identity, name)
        .await
        .map_err(|e| format!("{e:?}"))?;
    c.server_ready(ServerReadyRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn digits(id: &str) -> ModelInferRequest {
    let mut r = request(
        "digits",
        vec![raw("input", "FP32", &[1, 64], f32s(&[0.0; 64]))],
    );
    r.id = id.into();
    r
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    server: Leaf,
    gateway: Leaf,
}

impl Pki {
    /// A worker serving TLS with the server certificate.
    async fn tls_worker(&self) -> Worker {
        let (cert, key) = (s(&self.server.cert), s(&self.server.key));
        let flags = ["--grpc-server-cert", cert, "--grpc-server-key", key];
        Worker::start_tls(&models(), &flags, &self.ca.cert, None).await
    }

    /// A worker that also requires a client certificate from the CA, for the gateway's
    /// name only.
    async fn mtls_worker(&self) -> Worker {
        let (cert, key, ca) = (s(&self.server.cert), s(&self.server.key), s(&self.ca.cert));
        let flags = [
            "--grpc-server-cert",
            cert,
            "--grpc-server-key",
            key,
            "--grpc-use-ssl-mutual",
            "--grpc-root-cert",
            ca,
            "--grpc-allowed-client-names",
            "gateway.infermesh.test",
        ];
        Worker::start_tls(&models(), &flags, &self.ca.cert, Some(&self.gateway)).await
    }
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "mesh-ca");
    let server = ca.leaf(dir.path(), "server", &["localhost", "127.0.0.1"], 1);
    let gateway = ca.leaf(dir.path(), "gateway", &["gateway.infermesh.test"], 2);
    Pki {
        dir,
        ca,
        server,
        gateway,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn a_tls_worker_serves_tls_and_refuses_plaintext_while_its_health_port_stays_plain() {
    let p = pki();
    let worker = p.tls_worker().await;
    ready(worker.addr, &p.ca.cert, None, "localhost")
        .await
        .unwrap();
    let mut c = tls_client(worker.addr, &p.ca.cert, None, "127.0.0.1")
        .await
        .unwrap();
    let reply = c
        .model_infer(digits("over-tls"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.id, "over-tls");

    // A plaintext client gets no answer from the TLS port.
    let plain = tonic::transport::Endpoint::from_shared(worker.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => {
            let mut c =
                infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(ch);
            c.server_ready(ServerReadyRequest {}).await.is_err()
        }
    };
    assert!(refused, "a plaintext call was answered on the TLS port");

    // A certificate for another name is refused by the client.
    let err = ready(worker.addr, &p.ca.cert, None, "elsewhere.test")
        .await
        .unwrap_err();
    assert!(err.contains("NotValidForName"), "{err}");

    // Probes: the health port answers in plaintext.
    let mut h = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", worker.health_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    for service in ["", "digits"] {
        let status = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_no_certificate_another_ca_and_names_not_allowed() {
    let p = pki();
    let other = Ca::new(p.dir.path(), "other-ca");
    let stranger = other.leaf(p.dir.path(), "stranger", &["gateway.infermesh.test"], 3);
    let sibling =
        p.ca.leaf(p.dir.path(), "sibling", &["batch-job.infermesh.test"], 4);
    let worker = p.mtls_worker().await;
    let ca = &p.ca.cert;
    ready(worker.addr, ca, Some(&p.gateway), "localhost")
        .await
        .unwrap();
    for (who, leaf) in [
        ("no certificate", None),
        ("another CA", Some(&stranger)),
        ("a name not allowed", Some(&sibling)),
    ] {
        let refused = ready(worker.addr, ca, leaf, "localhost").await;
        assert!(refused.is_err(), "{who}: accepted");
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_gateway_speaks_mtls_to_workers_and_tls_to_clients() {
    let p = pki();
    let worker = p.mtls_worker().await;
    let gw = Gateway::start_tls(
        &[worker.addr],
        &[
            "--worker-tls-ca",
            s(&p.ca.cert),
            "--worker-tls-cert",
            s(&p.gateway.cert),
            "--worker-tls-key",
            s(&p.gateway.key),
            "--grpc-server-cert",
            s(&p.server.cert),
            "--grpc-server-key",
            s(&p.server.key),
        ],
        &p.ca.cert,
    )
    .await;
    let mut c = tls_client(gw.addr, &p.ca.cert, None, "localhost")
        .await
        .unwrap();
    for n in 0..5 {
        let id = format!("through-{n}");
        let reply = c.model_infer(digits(&id)).await.unwrap().into_inner();
        assert_eq!(reply.id, id);
    }
    // The gateway's client certificate rotated on disk is reloaded; requests go on.
    p.ca.leaf(p.dir.path(), "gateway", &["gateway.infermesh.test"], 20);
    let reloaded = "infermesh_config_reloads_total{file=\"worker-tls\",result=\"ok\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !infermesh_tests::metric_at(gw.metrics_addr, reloaded)
        .await
        .is_some_and(|v| v >= 1.0)
    {
        assert!(tokio::time::Instant::now() < deadline, "{reloaded} never 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = c.model_infer(digits("rotated")).await.unwrap().into_inner();
    assert_eq!(reply.id, "rotated");
    gw.stop().await.unwrap();

    // Without its client certificate the gateway gets nothing from the worker.
    let gw = Gateway::spawn_at(&[worker.addr], &["--worker-tls-ca", s(&p.ca.cert)]).await;
    let err = client(&gw.url())
        .await
        .model_infer(digits("no-cert"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    gw.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_reaches_new_connections_and_open_streams_go_on() {
    let p = pki();
    let worker = p.tls_worker().await;
    let mut old = tls_client(worker.addr, &p.ca.cert, None, "localhost")
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = old
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(digits("before")).await.unwrap();
    let first = replies.message().await.unwrap().unwrap();
    assert_eq!(first.infer_response.unwrap().id, "before");
    assert_eq!(
        served_certificate(worker.addr, &p.ca.cert).await,
        p.server.der
    );

    // Rotate: a new certificate (serial 10) under the same file names.
    let rotated =
        p.ca.leaf(p.dir.path(), "server", &["localhost", "127.0.0.1"], 10);
    worker
        .wait_metric(
            "infermesh_config_reloads_total{file=\"grpc-server-cert\",result=\"ok\"}",
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(
        served_certificate(worker.addr, &p.ca.cert).await,
        rotated.der,
        "a new connection gets the new certificate"
    );
    // The stream opened before the rotation goes on.
    tx.send(digits("after")).await.unwrap();
    let second = replies.message().await.unwrap().unwrap();
    assert_eq!(second.infer_response.unwrap().id, "after");
    drop(tx);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_certificate_on_disk_is_counted_and_the_last_good_one_stays() {
    let p = pki();
    let worker = p.tls_worker().await;
    std::fs::write(&p.server.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    worker
        .wait_metric(
            "infermesh_config_reloads_total{file=\"grpc-server-cert\",result=\"error\"}",
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(
        served_certificate(worker.addr, &p.ca.cert).await,
        p.server.der,
        "new connections still get the last good certificate"
    );
    ready(worker.addr, &p.ca.cert, None, "localhost")
        .await
        .unwrap();
    worker.stop().await.unwrap();
}

/// The certificate a new TLS connection to `addr` is given.
async fn served_certificate(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    let config = infermesh_core::tls::ClientFiles {
        ca: Some(ca.to_path_buf()),
        identity: None,
    }
    .load()
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
