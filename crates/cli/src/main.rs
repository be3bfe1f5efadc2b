//! `infermesh`: run a local mesh, call servers, check health.

mod bench;
mod health;
mod infer;
mod json;
mod load;
mod models;
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
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // `infermesh worker` honours --threads like infermesh-worker; tools use the default.
    let threads = match &command {
        Command::Worker(config) => infermesh_core::serve::worker_threads(config.server.threads),
        Command::Gateway(config) => config.server.threads,
        _ => 0,
    };
    infermesh_core::serve::runtime(threads)?.block_on(run(command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::Worker(config) => {
            let tracing =
                infermesh_core::telemetry::init_server(&config.server, "infermesh-worker");
            let listeners = infermesh_worker::Listeners::bind(&config.server).await?;
            let result =
                infermesh_worker::run(*config, listeners, infermesh_core::serve::signal()).await;
            if let Some(t) = tracing {
                t.shutdown(std::time::Duration::from_secs(3)).await;
            }
            Ok(result?)
        }
        Command::Gateway(config) => {
            let tracing =
                infermesh_core::telemetry::init_server(&config.server, "infermesh-gateway");
            let listeners = infermesh_gateway::Listeners::bind(&config.server).await?;
            let result =
                infermesh_gateway::run(*config, listeners, infermesh_core::serve::signal()).await;
            if let Some(t) = tracing {
                t.shutdown(std::time::Duration::from_secs(3)).await;
            }
            Ok(result?)
        }
        Command::Infer(args) => infer::run(args).await,
        Command::Health(args) => health::run(args).await,
        Command::Models(args) => models::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
