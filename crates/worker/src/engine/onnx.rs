//! ONNX Runtime through `ort` (load-dynamic). The only module that touches `ort`.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use bytemuck::Pod;
use bytes::Bytes;
use infermesh_core::{DataType, Tensor, TensorData};
use ort::{
    session::{builder::GraphOptimizationLevel, Session, SessionInputValue},
    value::{DynValue, PrimitiveTensorElementType, TensorElementType, TensorRef, ValueType},
};

use super::{Engine, GraphSpec, IoSpec, Provider};
use crate::Error;

/// The process-wide ONNX Runtime environment. `ort` keeps only a weak reference to it, so
/// it lives here for the life of the process.
static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Loads the ONNX Runtime library once per process. A missing or wrong library is a
/// recoverable error here rather than `ort`'s panic at first use.
pub fn init(lib: &Path) -> Result<(), Error> {
    if ENVIRONMENT.get().is_some() {
        return Ok(());
    }
    let env = ort::init_from(lib)
        .map_err(|e| {
            Error::Runtime(format!(
                "cannot load ONNX Runtime from {}: {e}",
                lib.display()
            ))
        })?
        .with_name("infermesh")
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start ONNX Runtime: {e}")))?;
    let _ = ENVIRONMENT.set(env);
    Ok(())
}

/// Where to look for the library when no flag or env var names it: beside the binary, then
/// where `scripts/fetch-ort.sh` puts it in a source checkout.
pub fn default_library_candidates() -> Vec<PathBuf> {
    const NAME: &str = "libonnxruntime.so.1.31.1";
    let mut out = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(NAME));
        out.push(dir.join("../lib").join(NAME));
    }
    out.push(PathBuf::from("/usr/local/lib").join(NAME));
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../.cache/onnxruntime/lib")
            .join(NAME),
    );
    out
}

/// How an instance asks for its device (Triton's instance_group kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    /// CUDA on this device or fail the load.
    Gpu(i32),
    /// CUDA on this device if it really initialises, else CPU (logged and reported).
    Auto(i32),
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub device: DeviceRequest,
    /// ONNX Runtime intra-op threads; 0 lets it pick (one per core).
    pub intra_op_threads: usize,
    /// Whether pool threads spin between runs (ONNX Runtime's default). Lower latency for
    /// one caller; a server wants them asleep, leaving the cores to the gRPC threads.
    pub spinning: bool,
}

pub struct OnnxEngine {
    session: Session,
    provider: Provider,
}

impl OnnxEngine {
    /// Builds a session for `path`. Call it on the thread that will own the engine.
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<(Self, GraphSpec), Error> {
        // A build without CUDA has nothing to try for KIND_AUTO.
        let device = match opts.device {
            DeviceRequest::Auto(_) if !cfg!(feature = "cuda") => DeviceRequest::Cpu,
            d => d,
        };
        let (session, provider) = match device {
            DeviceRequest::Cpu => (
                build(path, opts, None).map_err(load_err(path))?,
                Provider::Cpu,
            ),
            DeviceRequest::Gpu(d) => (
                build(path, opts, Some(d)).map_err(|e| {
                    Error::Load(format!(
                        "KIND_GPU asked for CUDA device {d}, which is not usable here: {e}"
                    ))
                })?,
                Provider::Cuda(d),
            ),
            DeviceRequest::Auto(d) => match build(path, opts, Some(d)) {
                Ok(s) => (s, Provider::Cuda(d)),
                Err(e) => {
                    tracing::warn!(model = %path.display(), reason = %e, "CUDA unavailable; instance falls back to CPU");
                    (
                        build(path, opts, None).map_err(load_err(path))?,
                        Provider::Cpu,
                    )
                }
            },
        };
        let spec = GraphSpec {
            inputs: session
                .inputs()
                .iter()
                .map(|o| io_spec(o.name(), o.dtype()))
                .collect::<Result<_, _>>()?,
            outputs: session
                .outputs()
                .iter()
                .map(|o| io_spec(o.name(), o.dtype()))
                .collect::<Result<_, _>>()?,
        };
        Ok((Self { session, provider }, spec))
    }
}

fn load_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Load(format!("ONNX Runtime cannot load {}: {e}", path.display()))
}

/// `SessionBuilder` errors are not `Send`; everything stays inside this function and only a
/// message leaves it.
fn build(path: &Path, opts: &SessionOptions, cuda: Option<i32>) -> Result<Session, String> {
    let env = ENVIRONMENT.get().ok_or("ONNX Runtime is not initialised")?;
    let text = |e: ort::Error<_>| e.to_string();
    let mut builder = Session::builder(env).map_err(|e| e.to_string())?;
    builder = builder
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(text)?;
    builder = builder
        .with_intra_op_spinning(opts.spinning)
        .map_err(text)?;
    builder = builder
        .with_inter_op_spinning(opts.spinning)
        .map_err(text)?;
    if opts.intra_op_threads > 0 {
        builder = builder
            .with_intra_threads(opts.intra_op_threads)
            .map_err(|e| e.to_string())?;
    }
    if let Some(device) = cuda {
        builder = with_cuda(builder, device)?;
    }
    builder.commit_from_file(path).map_err(|e| e.to_string())
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    device: i32,
) -> Result<ort::session::builder::SessionBuilder, String> {
    let ep = ort::ep::CUDA::default()
        .with_device_id(device)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([ep])
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _: ort::session::builder::SessionBuilder,
    _: i32,
) -> Result<ort::session::builder::SessionBuilder, String> {
    Err("this binary was built without the `cuda` feature".into())
}

fn io_spec(name: &str, t: &ValueType) -> Result<IoSpec, Error> {
    let ValueType::Tensor { ty, shape, .. } = t else {
        return Err(Error::Load(format!(
            "'{name}' is a {t:?}, not a tensor; only tensor inputs and outputs are served"
        )));
    };
    let datatype = from_ort(*ty).ok_or_else(|| {
        Error::Load(format!(
            "'{name}' has element type {ty:?}, which the protocol has no datatype for"
        ))
    })?;
    Ok(IoSpec {
        name: name.to_string(),
        datatype,
        dims: shape.to_vec(),
    })
}

fn from_ort(t: TensorElementType) -> Option<DataType> {
    use TensorElementType as T;
    Some(match t {
        T::Bool => DataType::Bool,
        T::Uint8 => DataType::U8,
        T::Uint16 => DataType::U16,
        T::Uint32 => DataType::U32,
        T::Uint64 => DataType::U64,
        T::Int8 => DataType::I8,
        T::Int16 => DataType::I16,
        T::Int32 => DataType::I32,
        T::Int64 => DataType::I64,
        T::Float16 => DataType::F16,
        T::Bfloat16 => DataType::BF16,
        T::Float32 => DataType::F32,
        T::Float64 => DataType::F64,
        T::String => DataType::Bytes,
        _ => return None,
    })
}

impl Engine for OnnxEngine {
    fn run(&mut self, inputs: &[Tensor], outputs: &[String]) -> Result<Vec<Tensor>, Error> {
        let values = inputs
            .iter()
            .map(|t| Ok((t.name.as_str(), to_value(t)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut results = self
            .session
            .run(values)
            .map_err(|e| Error::Runtime(e.to_string()))?;
        outputs
            .iter()
            .map(|name| {
                let v = results.remove(name).ok_or_else(|| {
                    Error::Runtime(format!("ONNX Runtime returned no output '{name}'"))
                })?;
                from_value(name, &v)
            })
            .collect()
    }

    fn provider(&self) -> Provider {
        self.provider
    }
}

// The wire format is little-endian; so is every platform ONNX Runtime ships for.
#[cfg(target_endian = "big")]
compile_error!("infermesh assumes a little-endian host");

fn to_value(t: &Tensor) -> Result<SessionInputValue<'_>, Error> {
    let shape = t.shape.clone();
    let bytes = match &t.data {
        TensorData::Fixed(b) => b,
        TensorData::Strings(items) => {
            let mut strs: Vec<String> = Vec::with_capacity(items.len());
            for (i, s) in items.iter().enumerate() {
                let s = std::str::from_utf8(s).map_err(|_| {
                    infermesh_core::invalid!(
                        "input '{}': BYTES element {i} is not UTF-8, which ONNX string tensors require",
                        t.name
                    )
                })?;
                strs.push(s.to_owned());
            }
            let v = ort::value::Tensor::from_string_array((shape, &strs[..])).map_err(rt)?;
            return Ok(v.into());
        }
    };
    match t.datatype {
        DataType::Bool => {
            let v: Vec<bool> = bytes.iter().map(|&b| b != 0).collect();
            Ok(ort::value::Tensor::from_array((shape, v))
                .map_err(rt)?
                .into())
        }
        DataType::U8 => fixed::<u8>(shape, bytes),
        DataType::U16 => fixed::<u16>(shape, bytes),
        DataType::U32 => fixed::<u32>(shape, bytes),
        DataType::U64 => fixed::<u64>(shape, bytes),
        DataType::I8 => fixed::<i8>(shape, bytes),
        DataType::I16 => fixed::<i16>(shape, bytes),
        DataType::I32 => fixed::<i32>(shape, bytes),
        DataType::I64 => fixed::<i64>(shape, bytes),
        DataType::F16 => fixed::<half::f16>(shape, bytes),
        DataType::BF16 => fixed::<half::bf16>(shape, bytes),
        DataType::F32 => fixed::<f32>(shape, bytes),
        DataType::F64 => fixed::<f64>(shape, bytes),
        DataType::Bytes => Err(Error::Runtime("BYTES tensor without string data".into())),
    }
}

/// Borrows the wire bytes when they are aligned for `T` (zero copy), copies otherwise.
fn fixed<T: PrimitiveTensorElementType + Pod + std::fmt::Debug>(
    shape: Vec<i64>,
    bytes: &Bytes,
) -> Result<SessionInputValue<'_>, Error> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(slice) => Ok(TensorRef::from_array_view((shape, slice))
            .map_err(rt)?
            .into()),
        Err(_) => {
            let owned: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
            Ok(ort::value::Tensor::from_array((shape, owned))
                .map_err(rt)?
                .into())
        }
    }
}

fn from_value(name: &str, v: &DynValue) -> Result<Tensor, Error> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(Error::Runtime(format!("output '{name}' is not a tensor")));
    };
    let datatype = from_ort(*ty)
        .ok_or_else(|| Error::Runtime(format!("output '{name}' has unsupported type {ty:?}")))?;
    let (shape, data) = match datatype {
        DataType::Bytes => {
            let (shape, strings) = v.try_extract_strings().map_err(rt)?;
            (
                shape.to_vec(),
                TensorData::Strings(strings.into_iter().map(Bytes::from).collect()),
            )
        }
        DataType::Bool => {
            let (shape, b) = v.try_extract_tensor::<bool>().map_err(rt)?;
            (
                shape.to_vec(),
                TensorData::Fixed(b.iter().map(|&x| x as u8).collect::<Vec<u8>>().into()),
            )
        }
        DataType::U8 => extract::<u8>(v)?,
        DataType::U16 => extract::<u16>(v)?,
        DataType::U32 => extract::<u32>(v)?,
        DataType::U64 => extract::<u64>(v)?,
        DataType::I8 => extract::<i8>(v)?,
        DataType::I16 => extract::<i16>(v)?,
        DataType::I32 => extract::<i32>(v)?,
        DataType::I64 => extract::<i64>(v)?,
        DataType::F16 => extract::<half::f16>(v)?,
        DataType::BF16 => extract::<half::bf16>(v)?,
        DataType::F32 => extract::<f32>(v)?,
        DataType::F64 => extract::<f64>(v)?,
    };
    Ok(Tensor {
        name: name.to_string(),
        datatype,
        shape,
        data,
    })
}

fn extract<T: PrimitiveTensorElementType + Pod>(
    v: &DynValue,
) -> Result<(Vec<i64>, TensorData), Error> {
    let (shape, data) = v.try_extract_tensor::<T>().map_err(rt)?;
    Ok((
        shape.to_vec(),
        TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(data))),
    ))
}

fn rt(e: ort::Error) -> Error {
    Error::Runtime(e.to_string())
}
