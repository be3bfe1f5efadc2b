//! `infermesh infer`: one request from the command line.

use std::path::PathBuf;

use anyhow::{bail, Context};
use infermesh_core::DataType;
use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, ModelInferRequest, ModelMetadataRequest,
};
use serde_json::{Map, Value};

use crate::rest::{Described, Prepared};

#[derive(clap::Args)]
pub struct InferArgs {
    /// Server address, e.g. localhost:8001, http://localhost:8001,
    /// https://infer.example.com:443, or an HTTP/REST port: http://localhost:8000.
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    #[command(flatten)]
    pub protocol: crate::rest::ProtocolArg,
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
        &args.protocol,
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
    protocol: &crate::rest::ProtocolArg,
    model: &str,
    version: &str,
    inputs: &[String],
) -> anyhow::Result<Map<String, Value>> {
    let conn = crate::conn::connect(url, conn).await?;
    let outputs = protocol
        .either(&conn, grpc(conn.clone(), model, version, inputs), async {
            let described = crate::rest::inputs(&conn, model, version).await?;
            let prepared = prepare(model, &described, inputs)?;
            crate::rest::infer(&conn, model, version, prepared).await
        })
        .await?;
    let mut out = Map::new();
    for o in outputs {
        out.insert(
            o.name.clone(),
            crate::json::decode(&o.name, &o.datatype, &o.shape, &o.raw)?,
        );
    }
    Ok(out)
}

async fn grpc(
    conn: crate::conn::Conn,
    model: &str,
    version: &str,
    inputs: &[String],
) -> anyhow::Result<Vec<Prepared>> {
    let mut client = GrpcInferenceServiceClient::new(conn)
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
    let described = meta.inputs;
    let mut req = ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        ..Default::default()
    };
    for p in prepare(model, &described, inputs)? {
        req.inputs.push(InferInputTensor {
            name: p.name,
            datatype: p.datatype,
            shape: p.shape,
            ..Default::default()
        });
        req.raw_input_contents.push(p.raw);
    }
    let resp = client
        .model_infer(req)
        .await
        .map_err(|s| anyhow::anyhow!("inference failed: {}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(resp
        .outputs
        .into_iter()
        .zip(resp.raw_output_contents)
        .map(|(o, raw)| Prepared {
            name: o.name,
            datatype: o.datatype,
            shape: o.shape,
            raw,
        })
        .collect())
}

/// The NAME=JSON|@FILE inputs as tensors of the datatypes and ranks the model declares.
fn prepare(
    model: &str,
    described: &[Described],
    inputs: &[String],
) -> anyhow::Result<Vec<Prepared>> {
    let mut out = Vec::with_capacity(inputs.len());
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
        let Some(info) = described.iter().find(|i| i.name == name) else {
            let known: Vec<_> = described.iter().map(|i| i.name.as_str()).collect();
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
        out.push(Prepared {
            name: name.into(),
            datatype: info.datatype.clone(),
            shape,
            raw,
        });
    }
    Ok(out)
}
