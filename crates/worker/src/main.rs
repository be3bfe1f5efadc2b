use clap::Parser;
use infermesh_core::serve;
use infermesh_worker::WorkerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = WorkerConfig::parse();
    infermesh_core::telemetry::init_logging(config.server.log_format);
    let listeners = infermesh_worker::Listeners::bind(&config.server).await?;
    infermesh_worker::run(config, listeners, serve::signal()).await?;
    Ok(())
}
