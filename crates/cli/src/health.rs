use std::time::Duration;

use anyhow::{bail, Context};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

#[derive(clap::Args)]
pub struct HealthArgs {
    /// Server address, e.g. localhost:8001 or http://localhost:8001, or an HTTP/REST port:
    /// http://localhost:8000.
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    #[command(flatten)]
    pub protocol: crate::rest::ProtocolArg,
    /// Health service to check: "" for the whole server, or a model name.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = infermesh_core::config::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let check = async {
        let conn = crate::conn::connect(&args.url, &args.conn).await?;
        let grpc = async {
            let resp = HealthClient::new(conn.clone())
                .check(HealthCheckRequest {
                    service: args.service.clone(),
                })
                .await
                .context("health check failed")?;
            anyhow::Ok(resp.into_inner().status())
        };
        let rest = async {
            Ok(match crate::rest::ready(&conn, &args.service).await? {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            })
        };
        args.protocol.either(&conn, grpc, rest).await
    };
    let status = tokio::time::timeout(args.timeout, check)
        .await
        .context("health check timed out")??;
    println!("{}", status.as_str_name());
    if status != ServingStatus::Serving {
        bail!("{} is {}", args.url, status.as_str_name());
    }
    Ok(())
}
