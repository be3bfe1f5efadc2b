//! `infermesh infer`: one request from the command line.

use std::path::PathBuf;

use anyhow::{bail, Context};
use infermesh_core::DataType;
use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, ModelInferRequest, ModelMetadataRequest,
};
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct InferArgs {
    /// Server address, e.g. localhost:8001, http://localhost:8001 or
    /// https://infer.example.com:443.
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Model version; empty lets the server pick the newest ready one.
    #[arg(long, default_value = "")]
    pub version: String,
    /// An input as NAME=JSON (a nested array) or NAME=@FILE (a file holding one). Datatype
    /// and rank come from the model's metadata; a missing batch dim is added.
    #[arg(long = "input", value_name = "NAME=JSON|@FILE", required = true)]
    pub inputs: Vec<String>,
    /// Print one JSON object {output: nested array} instead of one line per output.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: InferArgs) -> anyhow::Result<()> {
    let outputs = call(
        &args.url,
        &args.conn,
        &args.model,
        &args.version,
        &args.inputs,
    )
    .await?;
    if args.json {
        println!("{}", Value::Object(outputs));
    } else {
        for (name, value) in outputs {
            println!("{name}: {value}");
        }
    }
    Ok(())
}

/// Sends one request built from NAME=JSON inputs; returns outputs as nested arrays.
pub async fn call(
    url: &str,
    conn: &crate::conn::ConnArgs,
    model: &str,
    version: &str,
    inputs: &[String],
) -> anyhow::Result<Map<String, Value>> {
    let mut client = GrpcInferenceServiceClient::new(crate::conn::connect(url, conn).await?)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: model.into(),
            version: version.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("model metadata: {}: {}", s.code(), s.message()))?
        .into_inner();

    let mut req = ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        ..Default::default()
    };
    for spec in inputs {
        let (name, text) = spec
            .split_once('=')
            .with_context(|| format!("--input {spec}: expected NAME=JSON"))?;
        let text = match text.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(PathBuf::from(path))
                .with_context(|| format!("reading {path}"))?,
            None => text.to_string(),
        };
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("input '{name}': not JSON"))?;
        let Some(info) = meta.inputs.iter().find(|i| i.name == name) else {
            let known: Vec<_> = meta.inputs.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "model '{model}' has no input '{name}'; inputs: {}",
                known.join(", ")
            );
        };
        let datatype = DataType::parse(&info.datatype)
            .with_context(|| format!("unknown datatype {}", info.datatype))?;
        let (mut shape, raw) = crate::json::encode(name, datatype, &value)?;
        if shape.len() + 1 == info.shape.len() && info.shape.first() == Some(&-1) {
            shape.insert(0, 1);
        }
        req.inputs.push(InferInputTensor {
            name: name.into(),
            datatype: info.datatype.clone(),
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(raw);
    }
    let resp = client
        .model_infer(req)
        .await
        .map_err(|s| anyhow::anyhow!("inference failed: {}: {}", s.code(), s.message()))?
        .into_inner();
    let mut out = Map::new();
    for (o, raw) in resp.outputs.iter().zip(&resp.raw_output_contents) {
        out.insert(
            o.name.clone(),
            crate::json::decode(&o.name, &o.datatype, &o.shape, raw)?,
        );
    }
    Ok(out)
}
