//! The engine seam: what one model instance does with one batch. `ort` appears only in
//! `engine/onnx.rs`; the identity backend (tests, mesh measurements) sits beside it.

pub mod identity;
pub mod onnx;

use infermesh_core::{DataType, Tensor};

use crate::Error;

/// One input or output of a model graph as the engine sees it: full dims including a
/// batch dim, -1 where the graph leaves a dim open.
#[derive(Clone, Debug, PartialEq)]
pub struct IoSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<i64>,
}

/// What a loaded graph declares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphSpec {
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
}

/// Which device an instance really runs on (a requested GPU may have fallen back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Provider::Cpu => f.write_str("CPU"),
            Provider::Cuda(d) => write!(f, "CUDA:{d}"),
        }
    }
}

/// One model instance. Owned by exactly one OS thread; never called from the async runtime.
pub trait Engine: Send + 'static {
    /// Runs inputs (already validated against the graph) and returns the named outputs in
    /// the order asked.
    fn run(&mut self, inputs: &[Tensor], outputs: &[String]) -> Result<Vec<Tensor>, Error>;

    fn provider(&self) -> Provider;
}
