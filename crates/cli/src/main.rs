//! `infermesh`: run a local mesh, call servers, check health.

mod auth;
mod bench;
mod conn;
mod control;
mod health;
mod infer;
mod json;
mod load;
mod models;
mod rest;
mod routes;
mod routes_rules;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "infermesh",
    version = infermesh_core::VERSION,
    about = "gRPC inference mesh: local mesh, inference calls, health checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local mesh on a model repository (the bundled models by default), send one
    /// real request to prove it answers, and serve until Ctrl-C.
    Up(up::UpArgs),
    /// Run a worker, exactly like the `infermesh-worker` binary.
    Worker(Box<infermesh_worker::WorkerConfig>),
    /// Run a gateway, exactly like the `infermesh-gateway` binary.
    Gateway(Box<infermesh_gateway::GatewayConfig>),
    /// Send one inference request and print the outputs.
    Infer(infer::InferArgs),
    /// Load generator speaking the protocol (unary or one stream); `bench engine` runs
    /// ONNX Runtime alone, in-process.
    Bench(bench::BenchArgs),
    /// List a server's models with their states (RepositoryIndex).
    Models(models::ModelsArgs),
    /// grpc.health.v1 Check; exits 0 when SERVING (usable as a container HEALTHCHECK).
    Health(health::HealthArgs),
    /// API keys for --auth-config.
    Auth(auth::AuthArgs),
    /// Load (or reload) a model from the server's repository (RepositoryModelLoad); the
    /// server must run with --model-control-mode explicit or poll.
    Load(control::ControlArgs),
    /// Unload a model (RepositoryModelUnload); requests in flight finish.
    Unload(control::ControlArgs),
    /// A gateway's live routing policy (--routes): weights in force, versions skipped and
    /// why, hedge and win rates, shadow agreement, the guard's state.
    Routes(routes::RoutesArgs),
}

fn main() -> std::process::ExitCode {
    infermesh_core::exit(main_result())
}

fn main_result() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // `infermesh worker` honours --threads like infermesh-worker; tools use the default.
    let threads = match &command {
        Command::Worker(config) => infermesh_core::serve::worker_threads(config.server.threads),
        Command::Gateway(config) => config.server.threads,
        _ => 0,
    };
    let url = command.url();
    infermesh_core::serve::runtime(threads)?.block_on(async move {
        let result = run(command).await;
        match (result, url) {
            (Err(e), Some(url)) => {
                let text = format!("{e:#}");
                match conn::hint(&url, &text).await {
                    Some(hint) => Err(anyhow::anyhow!("{text}\nhint: {hint}")),
                    None => Err(e),
                }
            }
            (result, _) => result,
        }
    })
}

impl Command {
    /// The server a client command calls, for the hint after a failed call.
    fn url(&self) -> Option<String> {
        Some(match self {
            Command::Infer(a) => a.url.clone(),
            Command::Models(a) => a.url.clone(),
            Command::Health(a) => a.url.clone(),
            Command::Bench(a) if a.what.is_none() => a.load.url.clone(),
            Command::Load(a) | Command::Unload(a) => a.url.clone(),
            Command::Routes(a) => a.url.clone(),
            _ => return None,
        })
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::Worker(config) => {
            let server = config.server.clone();
            serve(&server, "infermesh-worker", |l| {
                infermesh_worker::run(*config, l, infermesh_core::serve::signal())
            })
            .await
        }
        Command::Gateway(config) => {
            let server = config.server.clone();
            serve(&server, "infermesh-gateway", |l| {
                infermesh_gateway::run(*config, l, infermesh_core::serve::signal())
            })
            .await
        }
        Command::Infer(args) => infer::run(args).await,
        Command::Health(args) => health::run(args).await,
        Command::Models(args) => models::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Auth(args) => auth::run(args),
        Command::Load(args) => control::load(args).await,
        Command::Unload(args) => control::unload(args).await,
        Command::Routes(args) => routes::run(args).await,
    }
}

/// Runs a server as its standalone binary does: logging and traces, its listeners, then
/// flushing the last spans.
async fn serve<F, E>(
    server: &infermesh_core::ServerArgs,
    name: &str,
    run: impl FnOnce(infermesh_core::serve::Listeners) -> F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let tracing = infermesh_core::telemetry::init_server(server, name);
    let listeners = infermesh_core::serve::Listeners::bind(server).await?;
    let result = run(listeners).await;
    if let Some(t) = tracing {
        t.shutdown(std::time::Duration::from_secs(3)).await;
    }
    Ok(result?)
}
