use clap::Parser;
use infermesh_core::serve;
use infermesh_gateway::{GatewayConfig, Listeners};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = GatewayConfig::parse();
    infermesh_core::telemetry::init_logging(config.server.log_format);
    let listeners = Listeners::bind(&config.server).await?;
    infermesh_gateway::run(config, listeners, serve::signal()).await?;
    Ok(())
}
