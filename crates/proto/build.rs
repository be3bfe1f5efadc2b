//! Compiles `proto/inference/*.proto` with protox (pure Rust, so no system protoc is
//! needed, not even in a Docker build) and generates tonic code into OUT_DIR.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "inference/grpc_service.proto",
        "inference/model_config.proto",
        "infermesh/admin/v1/routes.proto",
        "infermesh/placement/v1/placement.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;

    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("inference_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        // Undecodable bytes from a client are INVALID_ARGUMENT, not tonic-prost's INTERNAL.
        .codec_path("crate::codec::Codec")
        // Tensor payloads stay `Bytes` end to end: the gateway forwards them without a copy.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .bytes(".inference.InferTensorContents.bytes_contents")
        .compile_fds(fds)?;
    Ok(())
}
