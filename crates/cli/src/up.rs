//! `infermesh up`: a local mesh in one command: N workers on the model repository and a
//! gateway in front of them, proven with a real request through the gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use infermesh_gateway::GatewayConfig;
use infermesh_worker::WorkerConfig;
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Model repository; defaults to the bundled models of this checkout.
    #[arg(long, env = "INFERMESH_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Address the gateway listens on (what clients use).
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: std::net::SocketAddr,
    /// Workers to start (each on 127.0.0.1, a free port).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Exit after the self-check request instead of serving until Ctrl-C.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    infermesh_core::telemetry::init_logging(infermesh_core::telemetry::LogFormat::Text);
    let repo = args
        .model_repository
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Share the cores between the workers' ONNX Runtime pools instead of oversubscribing.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.workers.max(1)).max(1).to_string();

    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..args.workers.max(1) {
        let config = WorkerConfig::try_parse_from([
            "infermesh-worker".as_ref(),
            "--model-repository".as_ref(),
            repo.as_os_str(),
            "--intra-op-threads".as_ref(),
            threads.as_ref(),
            "--shutdown-grace".as_ref(),
            "0s".as_ref(),
        ])?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(grpc.local_addr()?.to_string());
        let listeners = infermesh_worker::Listeners {
            grpc,
            metrics: None,
        };
        let run = infermesh_worker::run(config, listeners, stopped(stop_rx.clone()));
        tasks.push(tokio::spawn(async move {
            run.await.map_err(|e| anyhow::anyhow!(e))
        }));
    }
    let config = GatewayConfig::try_parse_from([
        "infermesh-gateway".to_string(),
        "--workers".into(),
        addrs.join(","),
        "--shutdown-grace".into(),
        "0s".into(),
    ])?;
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = grpc.local_addr()?;
    let listeners = infermesh_gateway::Listeners {
        grpc,
        metrics: None,
    };
    let gateway = infermesh_gateway::run(config, listeners, stopped(stop_rx.clone()));
    tasks.push(tokio::spawn(async move {
        gateway.await.map_err(|e| anyhow::anyhow!(e))
    }));

    let checked = async {
        wait_ready(&addr.to_string()).await?;
        self_check(&addr.to_string(), &repo).await
    }
    .await;
    if checked.is_ok() {
        println!(
            "infermesh is up: gateway on {addr}, workers on {}. Try: infermesh infer --url {addr} --model digits --input input=@models/digits/example.json",
            addrs.join(", ")
        );
        if !args.check {
            println!("serving until Ctrl-C");
            infermesh_core::serve::signal().await;
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await??;
    }
    checked
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Ok(ch) = crate::infer::channel(url).await {
            let mut c =
                infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(ch);
            if let Ok(r) = c.server_ready(infermesh_proto::ServerReadyRequest {}).await {
                if r.into_inner().ready {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "worker not ready after 120 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Classifies the bundled digits samples through the mesh and compares with the labels.
async fn self_check(url: &str, repo: &std::path::Path) -> anyhow::Result<()> {
    let samples = repo.join("digits/samples.json");
    let Ok(text) = std::fs::read_to_string(&samples) else {
        println!(
            "(no {} here; skipping the self-check request)",
            samples.display()
        );
        return Ok(());
    };
    let v: Value = serde_json::from_str(&text)?;
    let inputs = vec![format!("input={}", v["inputs"])];
    let out = crate::infer::call(url, "digits", "", &inputs).await?;
    let got = &out["label"];
    println!("digits: predicted {got}, expected {}", v["labels"]);
    anyhow::ensure!(
        got == &v["labels"],
        "self-check failed: predictions differ from the expected labels"
    );
    Ok(())
}
