//! `infermesh load` and `infermesh unload`: RepositoryModelLoad / Unload on a worker or a
//! gateway (which forwards them to its workers when its own --model-control-mode allows).

use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient, RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest,
};

#[derive(clap::Args)]
pub struct ControlArgs {
    /// Server address, e.g. localhost:8001.
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    /// The model: one directory of the server's model repository.
    pub model: String,
}

pub async fn load(args: ControlArgs) -> anyhow::Result<()> {
    let mut client =
        GrpcInferenceServiceClient::new(crate::conn::connect(&args.url, &args.conn).await?);
    client
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: args.model.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("load '{}': {}: {}", args.model, s.code(), s.message()))?;
    println!("{}: loaded", args.model);
    Ok(())
}

pub async fn unload(args: ControlArgs) -> anyhow::Result<()> {
    let mut client =
        GrpcInferenceServiceClient::new(crate::conn::connect(&args.url, &args.conn).await?);
    client
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: args.model.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("unload '{}': {}: {}", args.model, s.code(), s.message()))?;
    println!("{}: unloaded", args.model);
    Ok(())
}
