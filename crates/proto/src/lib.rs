//! The KServe v2 / Triton gRPC protocol (`package inference`), generated at build time.

#![allow(clippy::all, clippy::pedantic)]

pub mod codec;

pub mod inference {
    tonic::include_proto!("inference");
}

/// infermesh's own admin API (`package infermesh.admin.v1`).
pub mod admin {
    tonic::include_proto!("infermesh.admin.v1");
}

/// infermesh's placement API (`package infermesh.placement.v1`): a worker's models and
/// memory as a stream of changes.
pub mod placement {
    tonic::include_proto!("infermesh.placement.v1");
}

/// Encoded `FileDescriptorSet` of `proto/`, served by gRPC reflection and used to parse
/// `config.pbtxt` files in protobuf text format.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");

pub use inference::*;
