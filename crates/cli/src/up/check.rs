//! `up --check`: one request to every model the repository has, through the mesh (zeros of
//! each input's shape, open dims as 1), and the bundled digits' labels where present. A
//! model that failed to load or whose request fails is named; any such model fails the
//! check.

use infermesh_core::DataType;
use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, ModelInferRequest, ModelMetadataRequest,
    RepositoryIndexRequest,
};

use super::Mesh;

/// Names every model that failed, with why; Ok when every model answered.
pub async fn every_model(mesh: &Mesh) -> anyhow::Result<()> {
    let mut client =
        GrpcInferenceServiceClient::new(crate::conn::connect(&mesh.url, &mesh.conn).await?);
    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("repository index: {}: {}", s.code(), s.message()))?
        .into_inner();
    let mut names: Vec<String> = index.models.iter().map(|m| m.name.clone()).collect();
    names.sort();
    names.dedup();
    let mut failed = Vec::new();
    for name in &names {
        let ready = index
            .models
            .iter()
            .any(|m| &m.name == name && m.state == "READY");
        let outcome = if ready {
            zeros(&mut client, name).await
        } else {
            let why: Vec<&str> = index
                .models
                .iter()
                .filter(|m| &m.name == name)
                .map(|m| m.reason.as_str())
                .collect();
            Err(anyhow::anyhow!("not loaded: {}", why.join("; ")))
        };
        match outcome {
            Ok(()) => println!("check: {name}: answered"),
            Err(e) => failed.push(format!("{name} ({e:#})")),
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "check failed for {} of {} models: {}",
        failed.len(),
        names.len(),
        failed.join("; ")
    );
    Ok(())
}

/// One request of zeros to `model`.
async fn zeros(
    client: &mut GrpcInferenceServiceClient<crate::conn::Conn>,
    model: &str,
) -> anyhow::Result<()> {
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("metadata: {}: {}", s.code(), s.message()))?
        .into_inner();
    let mut req = ModelInferRequest {
        model_name: model.into(),
        ..Default::default()
    };
    for input in &meta.inputs {
        let datatype = DataType::parse(&input.datatype)
            .ok_or_else(|| anyhow::anyhow!("input '{}': unknown datatype", input.name))?;
        let shape: Vec<i64> = input.shape.iter().map(|&d| d.max(1)).collect();
        let count = shape.iter().product::<i64>().max(0) as usize;
        // BYTES: each element is a u32 length, here 0.
        let size = datatype.size().unwrap_or(4);
        req.inputs.push(InferInputTensor {
            name: input.name.clone(),
            datatype: input.datatype.clone(),
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(vec![0u8; count * size].into());
    }
    client
        .model_infer(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
    Ok(())
}
