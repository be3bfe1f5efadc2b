use clap::Parser;
use infermesh_core::serve;
use infermesh_gateway::{GatewayConfig, Listeners};

fn main() -> std::process::ExitCode {
    infermesh_core::exit(main_result())
}

fn main_result() -> anyhow::Result<()> {
    let config = GatewayConfig::parse();
    serve::runtime(serve::gateway_threads(config.server.threads))?.block_on(async move {
        let tracing = infermesh_core::telemetry::init_server(&config.server, "infermesh-gateway");
        let listeners = Listeners::bind(&config.server).await?;
        let result = infermesh_gateway::run(config, listeners, serve::signal()).await;
        if let Some(t) = tracing {
            t.shutdown(std::time::Duration::from_secs(3)).await;
        }
        Ok(result?)
    })
}
