//! `infermesh up`: a local mesh in one command: N workers as child processes on free
//! ports (restarted on the same port if one dies), the gateway in front of them, and a real
//! request through the gateway to prove it answers. Ctrl-C stops everything cleanly.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::Context;
use clap::Parser;
use infermesh_gateway::GatewayConfig;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
    sync::watch,
};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Model repository; defaults to the bundled models of this checkout.
    #[arg(long, env = "INFERMESH_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Address the gateway listens on (what clients use).
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: std::net::SocketAddr,
    /// Workers to start (child processes on 127.0.0.1, free ports).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Exit after the self-check request instead of serving until Ctrl-C.
    #[arg(long)]
    pub check: bool,
}

/// One worker child and how to start it again.
struct Slot {
    args: Vec<String>,
    addr: String,
    child: Child,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    infermesh_core::telemetry::init_logging(infermesh_core::telemetry::LogFormat::Text);
    let repo = args
        .model_repository
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    // Share the cores between the workers' ONNX Runtime pools instead of oversubscribing.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.workers.max(1)).max(1).to_string();

    let mut slots = Vec::new();
    for _ in 0..args.workers.max(1) {
        let base = vec![
            "worker".to_string(),
            "--model-repository".into(),
            repo.display().to_string(),
            "--intra-op-threads".into(),
            threads.clone(),
            "--grpc-address".into(),
            "127.0.0.1".into(),
            "--allow-metrics".into(),
            "false".into(),
            "--shutdown-grace".into(),
            "0s".into(),
            "--log-format".into(),
            "json".into(),
        ];
        let (child, addr) = spawn_worker(&base, "0").await?;
        slots.push(Slot {
            args: base,
            addr,
            child,
        });
    }
    let addrs: Vec<String> = slots.iter().map(|s| s.addr.clone()).collect();
    let pids: Vec<String> = slots
        .iter()
        .map(|s| s.child.id().unwrap_or(0).to_string())
        .collect();

    let (stop_tx, stop_rx) = watch::channel(false);
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
    let mut gw_stop = stop_rx.clone();
    let gateway = tokio::spawn(infermesh_gateway::run(config, listeners, async move {
        let _ = gw_stop.wait_for(|s| *s).await;
    }));
    let supervisor = tokio::spawn(supervise(slots, stop_rx.clone()));

    let checked = async {
        wait_ready(&addr.to_string()).await?;
        self_check(&addr.to_string(), &repo).await
    }
    .await;
    if checked.is_ok() {
        println!(
            "infermesh is up: gateway on {addr}, workers on {} (pids {})",
            addrs.join(", "),
            pids.join(", ")
        );
        println!("  infermesh infer --url {addr} --model digits --input input=@models/digits/example.json");
        println!("  .venv/bin/grpcurl -plaintext -d '{{\"name\":\"mlp\"}}' {addr} inference.GRPCInferenceService/ModelMetadata");
        println!(
            "  python -c 'import tritonclient.grpc as g; print(g.InferenceServerClient(\"{addr}\").get_model_metadata(\"mlp\"))'"
        );
        if !args.check {
            println!("serving until Ctrl-C");
            infermesh_core::serve::signal().await;
        }
    }
    let _ = stop_tx.send(true);
    gateway.await?.map_err(|e| anyhow::anyhow!(e))?;
    supervisor.await??;
    checked
}

/// Starts `infermesh worker` and learns its bound address from its JSON log.
async fn spawn_worker(base: &[String], port: &str) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .args(base)
        .args(["--grpc-port", port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker")?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(a) = v["fields"]["address"].as_str() {
                return Ok(a.to_string());
            }
        }
        anyhow::bail!("worker exited before listening")
    })
    .await
    .context("worker did not start listening within 60 s")??;
    // Keep draining its log so it never blocks on a full pipe; show its warnings.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
                eprintln!("worker: {line}");
            }
        }
    });
    Ok((child, addr))
}

/// Restarts a worker that dies (on its old port, so the gateway finds it again); on stop,
/// sends SIGTERM to every worker and waits for them.
async fn supervise(mut slots: Vec<Slot>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        let exited = {
            let exits =
                futures::future::select_all(slots.iter_mut().map(|s| Box::pin(s.child.wait())));
            tokio::select! {
                (status, i, _) = exits => Some((i, status.ok())),
                _ = stop.wait_for(|s| *s) => None,
            }
        };
        let Some((i, status)) = exited else { break };
        let slot = &mut slots[i];
        let port = slot.addr.rsplit(':').next().unwrap_or("0").to_string();
        eprintln!("worker {} exited ({status:?}); restarting it", slot.addr);
        let (child, addr) = spawn_worker(&slot.args, &port).await?;
        slot.child = child;
        slot.addr = addr;
    }
    for s in &slots {
        if let Some(pid) = s.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for s in &mut slots {
        let _ = tokio::time::timeout(Duration::from_secs(60), s.child.wait()).await;
    }
    Ok(())
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
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
            "mesh not ready after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
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
