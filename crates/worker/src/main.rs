use clap::Parser;
use infermesh_core::serve;
use infermesh_worker::WorkerConfig;

fn main() -> std::process::ExitCode {
    infermesh_core::exit(main_result())
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
