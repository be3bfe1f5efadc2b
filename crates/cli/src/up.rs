//! `infermesh up`: a local mesh in one command: N workers as child processes on free
//! ports (restarted on the same port if one dies once the mesh is up), the gateway in front
//! of them, and a real request through the gateway to prove it answers. A worker that
//! exits or can serve nothing before the mesh is ready fails `up` at once, with the
//! worker's own last lines. Ctrl-C stops everything cleanly.

mod check;
mod child;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use child::Worker;
use clap::Parser;
use infermesh_gateway::GatewayConfig;
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Model repository; defaults to the bundled models of this checkout.
    #[arg(long, env = "INFERMESH_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Address the gateway listens on (what clients use).
    #[arg(long, env = "INFERMESH_UP_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: std::net::SocketAddr,
    /// Address the gateway serves KServe v2 HTTP/REST on; default: --listen's address with
    /// port 8000 when --listen's port is 8001, else a free port (printed).
    #[arg(long, env = "INFERMESH_UP_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Workers to start (child processes on 127.0.0.1, free ports).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Send one request to every model (zeros of each input's shape; the bundled digits
    /// also checked against their labels) and exit: non-zero, naming each model that
    /// failed, if any did. Without it, up serves until Ctrl-C.
    #[arg(long)]
    pub check: bool,
    /// Serve Prometheus /metrics from every process, on free 127.0.0.1 ports (printed).
    #[arg(long)]
    pub metrics: bool,
    /// Serve the gateway's port over TLS with this certificate chain (PEM); it must be
    /// valid for the --listen address (e.g. an IP SAN 127.0.0.1, as mkcert's are). The
    /// workers behind it stay on loopback in plaintext.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that `up`'s own checks and printed commands verify the
    /// gateway with; default: the system's.
    #[arg(long, requires = "cert")]
    pub ca: Option<PathBuf>,
    /// A flag for the gateway, as FLAG=VALUE or a bare FLAG; repeat it for more (e.g.
    /// `--gateway-flag --model-control-mode=explicit --gateway-flag --auth-config=auth.yaml`).
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub gateway_flag: Vec<String>,
    /// Flags for every worker, after `--` (e.g. `infermesh up -- --intra-op-threads 2`).
    #[arg(last = true, value_name = "WORKER FLAGS")]
    pub worker_flags: Vec<String>,
}

/// The checkout this binary was built from (its bundled models and .venv), if still there.
fn checkout() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// How to call this binary: `infermesh` when that is what PATH finds, else its path.
fn this_binary() -> String {
    let me = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let found = std::fs::canonicalize(d.join("infermesh")).ok();
            found.is_some() && found == me.as_ref().and_then(|m| std::fs::canonicalize(m).ok())
        })
    });
    match (on_path, me) {
        (false, Some(me)) => me.display().to_string(),
        _ => "infermesh".into(),
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    infermesh_core::telemetry::init_logging(infermesh_core::telemetry::LogFormat::Text);
    let repo = args
        .model_repository
        .clone()
        .unwrap_or_else(|| checkout().join("models"));
    // Share the cores between the workers' ONNX Runtime pools instead of oversubscribing.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.workers.max(1)).max(1).to_string();
    let metrics: &[&str] = if args.metrics {
        &["--metrics-address", "127.0.0.1", "--metrics-port", "0"]
    } else {
        &["--allow-metrics", "false"]
    };
    let mut base: Vec<String> = [
        "worker",
        "--model-repository",
        &repo.display().to_string(),
        "--intra-op-threads",
        &threads,
        "--grpc-address",
        "127.0.0.1",
        "--shutdown-grace",
        "0s",
        // A local mesh is its user's own: full messages even if they add --auth-config.
        "--verbose-errors",
        "--health-address",
        "127.0.0.1",
        "--health-port",
        "0",
    ]
    .iter()
    .chain(metrics)
    .map(|s| s.to_string())
    .collect();
    // Given last, so they win over the defaults above; the log format is ours to read.
    base.extend(args.worker_flags.iter().cloned());
    base.extend(["--log-format".into(), "json".into()]);

    let (fatal_tx, mut fatal) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for _ in 0..args.workers.max(1) {
        match Worker::spawn(&base, "0", fatal_tx.clone()).await {
            Ok(w) => workers.push(w),
            Err(e) => {
                stop_all(&mut workers).await;
                return Err(e);
            }
        }
    }
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();

    let (stop_tx, stop_rx) = watch::channel(false);
    // What up sets itself (its listeners, TLS and workers) cannot come from a flag, which
    // would be accepted and then not used.
    const OWN: &[(&str, &str)] = &[
        ("--grpc-address", "--listen"),
        ("--grpc-port", "--listen"),
        ("--http-", "--http-listen"),
        ("--allow-http", "--http-listen"),
        ("--health-", "nothing: up binds it on loopback"),
        ("--metrics-", "--metrics"),
        ("--allow-metrics", "--metrics"),
        ("--allow-health-port", "nothing: up binds it on loopback"),
        ("--workers", "--workers"),
        ("--grpc-server-", "--cert and --key"),
        ("--grpc-use-ssl", "--cert and --key"),
        ("--grpc-root-cert", "--cert and --key"),
    ];
    for f in &args.gateway_flag {
        if let Some((_, instead)) = OWN.iter().find(|(own, _)| f.starts_with(own)) {
            stop_all(&mut workers).await;
            anyhow::bail!("--gateway-flag {f}: up sets this itself; use {instead}");
        }
    }
    let gateway_args = [
        "infermesh-gateway".to_string(),
        "--workers".into(),
        addrs.join(","),
        "--shutdown-grace".into(),
        "0s".into(),
    ]
    .into_iter()
    .chain(args.gateway_flag.iter().cloned());
    let config = match GatewayConfig::try_parse_from(gateway_args) {
        Ok(c) => c,
        Err(e) => {
            stop_all(&mut workers).await;
            anyhow::bail!("--gateway-flag: {}", e.render().to_string().trim());
        }
    };
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let addr = grpc.local_addr()?;
    let http_at = args.http_listen.unwrap_or_else(|| {
        let port = if args.listen.port() == 8001 { 8000 } else { 0 };
        std::net::SocketAddr::new(args.listen.ip(), port)
    });
    let http = TcpListener::bind(http_at)
        .await
        .with_context(|| format!("cannot listen for HTTP/REST on {http_at} (--http-listen)"))?;
    let http_addr = http.local_addr()?;
    let gw_metrics = match args.metrics {
        true => Some(TcpListener::bind("127.0.0.1:0").await?),
        false => None,
    };
    let gw_metrics_addr = gw_metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    // The gateway's health port on a free loopback port: `up` runs several servers on one
    // host, and 8003 would be taken by the first.
    let listeners = infermesh_gateway::Listeners {
        grpc,
        metrics: gw_metrics,
        health: Some(TcpListener::bind("127.0.0.1:0").await?),
        http: Some(http),
        tls: server_tls(&args)?,
    };
    let mesh = Mesh {
        url: match args.cert {
            Some(_) => format!("https://{addr}"),
            None => addr.to_string(),
        },
        http: match args.cert {
            Some(_) => format!("https://{http_addr}"),
            None => format!("http://{http_addr}"),
        },
        conn: crate::conn::ConnArgs {
            ca: args.ca.clone(),
            ..Default::default()
        },
    };
    let mut gw_stop = stop_rx.clone();
    let gateway = tokio::spawn(infermesh_gateway::run(config, listeners, async move {
        let _ = gw_stop.wait_for(|s| *s).await;
    }));

    // Until the mesh answers, a worker that exits or says it can serve nothing is fatal:
    // waiting would only end in a timeout that hides the reason.
    let started = workers.len();
    let checked = {
        let exits =
            futures::future::select_all(workers.iter_mut().map(|w| Box::pin(w.child.wait())));
        tokio::select! {
            r = async {
                wait_ready(&mesh, started).await?;
                self_check(&mesh, &repo).await?;
                match args.check {
                    true => check::every_model(&mesh).await,
                    false => Ok(()),
                }
            } => r.map(|_| None),
            Some(why) = fatal.recv() => Err(anyhow::anyhow!(why)),
            (status, i, _) = exits => Ok(Some((i, status.ok()))),
        }
    };
    let checked = match checked {
        Ok(None) => Ok(()),
        Ok(Some((i, status))) => {
            let lines = workers[i].last_lines().await;
            let what = status.map_or("?".into(), |s| s.to_string());
            Err(anyhow::anyhow!(
                "worker {} exited ({what}) before the mesh was ready; its last lines:\n{lines}",
                workers[i].addr
            ))
        }
        Err(e) => Err(e),
    };
    let mut supervisor = None;
    if checked.is_ok() {
        print_hints(&mesh, &workers, gw_metrics_addr).await;
        if !args.check {
            supervisor = Some(tokio::spawn(supervise(
                workers,
                base,
                fatal_tx,
                stop_rx.clone(),
            )));
            workers = Vec::new();
            println!("serving until Ctrl-C");
            infermesh_core::serve::signal().await;
        }
    }
    let _ = stop_tx.send(true);
    gateway.await?.map_err(|e| anyhow::anyhow!(e))?;
    if let Some(s) = supervisor {
        s.await??;
    }
    stop_all(&mut workers).await;
    checked
}

/// How clients reach the mesh: its URL (https:// with --cert) and the CA to trust.
struct Mesh {
    url: String,
    conn: crate::conn::ConnArgs,
    /// The gateway's HTTP/REST address (URL).
    http: String,
}

impl Mesh {
    /// The flags every printed command needs for TLS (`flag` is the tool's CA flag).
    fn ca_flag(&self, flag: &str) -> String {
        match &self.conn.ca {
            Some(ca) => format!(" {flag} {}", ca.display()),
            None => String::new(),
        }
    }
}

/// The gateway's TLS material from --cert/--key, if given.
fn server_tls(args: &UpArgs) -> anyhow::Result<Option<infermesh_core::tls::ServerTls>> {
    let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
        return Ok(None);
    };
    let files = infermesh_core::tls::ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
        allowed_names: Vec::new(),
    };
    infermesh_core::tls::ServerTls::load(files)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("--cert/--key: {e}"))
}

/// What to try next, with the models this repository really serves and tools that exist.
async fn print_hints(mesh: &Mesh, workers: &[Worker], gw_metrics: Option<std::net::SocketAddr>) {
    let addr = mesh.url.as_str();
    let pids: Vec<String> = workers
        .iter()
        .map(|w| w.child.id().unwrap_or(0).to_string())
        .collect();
    let addrs: Vec<&str> = workers.iter().map(|w| w.addr.as_str()).collect();
    println!(
        "infermesh is up: gateway on {addr}, workers on {} (pids {}), HTTP/REST on {}",
        addrs.join(", "),
        pids.join(", "),
        mesh.http
    );
    if let Some(m) = gw_metrics {
        let each: Vec<String> = workers
            .iter()
            .filter_map(|w| w.metrics.as_ref().map(|m| format!("http://{m}/metrics")))
            .collect();
        println!(
            "  metrics: gateway http://{m}/metrics, workers {}",
            each.join(", ")
        );
    }
    let models = ready_models(mesh).await;
    let model = models
        .iter()
        .find(|m| *m == "mlp")
        .or(models.first())
        .cloned()
        .unwrap_or_else(|| "MODEL".into());
    let cli = this_binary();
    let ca = mesh.ca_flag("--ca");
    println!("  {cli} models --url {addr}{ca}");
    println!("  curl {}/v2/models/{model}", mesh.http);
    let example = checkout().join("models/digits/example.json");
    if models.iter().any(|m| m == "digits") && example.exists() {
        println!(
            "  {cli} infer --url {addr}{ca} --model digits --input input=@{}",
            example.display()
        );
    }
    let venv = checkout().join(".venv/bin");
    let grpcurl = venv.join("grpcurl");
    let grpcurl = match grpcurl.exists() {
        true => grpcurl.display().to_string(),
        false => "grpcurl".into(),
    };
    // grpcurl and tritonclient take host:port, and their own TLS flags.
    let host = addr.trim_start_matches("https://");
    let security = match mesh.conn.ca.is_some() || addr.starts_with("https://") {
        true => mesh.ca_flag("-cacert"),
        false => " -plaintext".into(),
    };
    println!("  {grpcurl}{security} -d '{{\"name\":\"{model}\"}}' {host} inference.GRPCInferenceService/ModelMetadata");
    let python = venv.join("python");
    let python = match python.exists() {
        true => python.display().to_string(),
        false => "python3  # needs: pip install 'tritonclient[grpc]'\n   ".into(),
    };
    let ssl = match (&mesh.conn.ca, addr.starts_with("https://")) {
        (Some(ca), _) => format!(", ssl=True, root_certificates=\"{}\"", ca.display()),
        (None, true) => ", ssl=True".into(),
        (None, false) => String::new(),
    };
    println!(
        "  {python} -c 'import tritonclient.grpc as g; print(g.InferenceServerClient(\"{host}\"{ssl}).get_model_metadata(\"{model}\"))'"
    );
}

/// Names of the models the mesh has ready.
async fn ready_models(mesh: &Mesh) -> Vec<String> {
    let Ok(ch) = crate::conn::connect(&mesh.url, &mesh.conn).await else {
        return Vec::new();
    };
    let mut c = infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(ch);
    let request = infermesh_proto::RepositoryIndexRequest {
        ready: true,
        ..Default::default()
    };
    let mut names: Vec<String> = match c.repository_index(request).await {
        Ok(r) => r.into_inner().models.into_iter().map(|m| m.name).collect(),
        Err(_) => Vec::new(),
    };
    names.dedup();
    names
}

/// Restarts a worker that dies (on its old port, so the gateway finds it again); a restart
/// that fails is tried again with a backoff (1 s doubling to 30 s), while the other
/// workers keep serving and the status line says how many are up. On stop, sends SIGTERM
/// to every worker and waits for them.
async fn supervise(
    mut workers: Vec<Worker>,
    args: Vec<String>,
    fatal: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let total = workers.len();
    'serving: loop {
        let exited = {
            let exits =
                futures::future::select_all(workers.iter_mut().map(|w| Box::pin(w.child.wait())));
            tokio::select! {
                (status, i, _) = exits => Some((i, status.ok())),
                _ = stop.wait_for(|s| *s) => None,
            }
        };
        let Some((i, status)) = exited else { break };
        let addr = workers[i].addr.clone();
        let port = addr.rsplit(':').next().unwrap_or("0").to_string();
        let lines = workers[i].last_lines().await;
        eprintln!("worker {addr} exited ({status:?}); restarting it. Its last lines:\n{lines}");
        let mut backoff = Duration::from_secs(1);
        loop {
            match Worker::spawn(&args, &port, fatal.clone()).await {
                Ok(w) => {
                    workers[i] = w;
                    eprintln!("worker {addr} restarted; {total} of {total} workers up");
                    break;
                }
                Err(e) => {
                    eprintln!(
                        "worker {addr} could not be restarted: {e:#}; {} of {total} workers up; trying again in {backoff:?}",
                        total - 1
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => break 'serving,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    stop_all(&mut workers).await;
    Ok(())
}

/// SIGTERM to every worker, then waits for each (bounded).
async fn stop_all(workers: &mut [Worker]) {
    for w in workers.iter() {
        if let Some(pid) = w.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for w in workers.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(60), w.child.wait()).await;
    }
}

async fn wait_ready(mesh: &Mesh, workers: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let connected = crate::conn::connect(&mesh.url, &mesh.conn).await;
        // A certificate this client will never trust does not get better by waiting.
        if let Err(e) = &connected {
            let text = format!("{e:#}");
            if let Some(hint) = crate::conn::tls_hint(&text) {
                anyhow::bail!("{text}\nhint: {hint}");
            }
        }
        if let Ok(ch) = connected {
            let mut c =
                infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(ch);
            if let Ok(r) = c.server_ready(infermesh_proto::ServerReadyRequest {}).await {
                // Every worker ready as the gateway sees it (the index lists each worker's
                // state), not just one: a request right after `up` says so may go to any.
                if r.into_inner().ready && ready_workers(&mut c).await >= workers {
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

/// Workers the gateway reports ready: its RepositoryIndex lists each as `ADDR ready` or
/// `ADDR unready: why` (`infermesh-worker` metadata).
async fn ready_workers<T>(
    c: &mut infermesh_proto::grpc_inference_service_client::GrpcInferenceServiceClient<T>,
) -> usize
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let asked = infermesh_proto::RepositoryIndexRequest {
        repository_name: String::new(),
        ready: false,
    };
    match c.repository_index(asked).await {
        Ok(r) => r
            .metadata()
            .get_all("infermesh-worker")
            .iter()
            .filter(|v| {
                v.to_str()
                    .is_ok_and(|s| s.split_once(' ').is_some_and(|(_, state)| state == "ready"))
            })
            .count(),
        Err(_) => 0,
    }
}

/// Classifies the bundled digits samples through the mesh and compares with the labels.
async fn self_check(mesh: &Mesh, repo: &std::path::Path) -> anyhow::Result<()> {
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
    let out = crate::infer::call(
        &mesh.url,
        &mesh.conn,
        &Default::default(),
        "digits",
        "",
        &inputs,
    )
    .await?;
    let got = &out["label"];
    println!("digits: predicted {got}, expected {}", v["labels"]);
    anyhow::ensure!(
        got == &v["labels"],
        "self-check failed: predictions differ from the expected labels"
    );
    Ok(())
}
