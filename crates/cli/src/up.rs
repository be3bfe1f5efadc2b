//! `infermesh up`: a local mesh in one command. Today that is one worker on the model
//! repository; the gateway joins it when it lands.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use infermesh_worker::WorkerConfig;
use serde_json::Value;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Model repository; defaults to the bundled models of this checkout.
    #[arg(long, env = "INFERMESH_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Address the worker listens on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: std::net::SocketAddr,
    /// Exit after the self-check request instead of serving until Ctrl-C.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    infermesh_core::telemetry::init_logging(infermesh_core::telemetry::LogFormat::Text);
    let repo = args
        .model_repository
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let config = WorkerConfig::try_parse_from([
        "infermesh-worker".as_ref(),
        "--model-repository".as_ref(),
        repo.as_os_str(),
        "--shutdown-grace".as_ref(),
        "0s".as_ref(),
    ])?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listeners = infermesh_worker::Listeners {
        grpc: listener,
        metrics: None,
    };
    let worker = tokio::spawn(infermesh_worker::run(config, listeners, async {
        tokio::select! {
            _ = stop_rx => {}
            () = infermesh_core::serve::signal() => {}
        }
    }));

    wait_ready(&addr.to_string()).await?;
    self_check(&addr.to_string(), &repo).await?;
    println!("infermesh is up: worker on {addr} (grpc). Try: infermesh infer --url {addr} --model digits --input input=@models/digits/example.json");
    if args.check {
        let _ = stop_tx.send(());
    } else {
        println!("serving until Ctrl-C");
    }
    worker.await?.map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
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
