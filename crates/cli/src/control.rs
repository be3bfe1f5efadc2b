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
    control(args, true).await
}

pub async fn unload(args: ControlArgs) -> anyhow::Result<()> {
    control(args, false).await
}

async fn control(args: ControlArgs, load: bool) -> anyhow::Result<()> {
    let mut client =
        GrpcInferenceServiceClient::new(crate::conn::connect(&args.url, &args.conn).await?);
    let model_name = args.model.clone();
    let (verb, done) = if load {
        let req = RepositoryModelLoadRequest {
            model_name,
            ..Default::default()
        };
        (
            ("load", "loaded"),
            client.repository_model_load(req).await.map(drop),
        )
    } else {
        let req = RepositoryModelUnloadRequest {
            model_name,
            ..Default::default()
        };
        (
            ("unload", "unloaded"),
            client.repository_model_unload(req).await.map(drop),
        )
    };
    done.map_err(|s| {
        anyhow::anyhow!("{} '{}': {}: {}", verb.0, args.model, s.code(), s.message())
    })?;
    println!("{}: {}", args.model, verb.1);
    Ok(())
}
