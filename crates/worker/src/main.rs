use clap::Parser;
use infermesh_core::serve;
use infermesh_worker::WorkerConfig;

/// A user's error is one line (its causes joined by ": "), never a backtrace, whatever
/// RUST_BACKTRACE says; exit status 1.
fn main() -> std::process::ExitCode {
    match main_result() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main_result() -> anyhow::Result<()> {
    let config = WorkerConfig::parse();
    serve::runtime(serve::worker_threads(config.server.threads))?.block_on(async move {
        let tracing = infermesh_core::telemetry::init_server(&config.server, "infermesh-worker");
        let listeners = infermesh_worker::Listeners::bind(&config.server).await?;
        let result = infermesh_worker::run(config, listeners, serve::signal()).await;
        if let Some(t) = tracing {
            t.shutdown(std::time::Duration::from_secs(3)).await;
        }
        Ok(result?)
    })
}
