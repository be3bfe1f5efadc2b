//! `model_warmup`, as Triton runs it: each sample (zeros, random data, or a file from the
//! model's `warmup/` directory) runs `count` times on every instance before the version
//! turns READY; a sample that fails fails the load with its reason. Without samples, each
//! instance runs once on zeros.

use std::path::Path;

use infermesh_core::{DataType, Tensor, TensorData};
use infermesh_proto as pb;
use pb::model_warmup::input::InputDataType;

use crate::Error;

/// One warmup sample: its inputs, run `count` times.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub inputs: Vec<Tensor>,
    pub count: u32,
}

/// The samples of `config.model_warmup`; files are read from `<model_dir>/warmup/`.
pub fn samples(config: &pb::ModelConfig, model_dir: &Path) -> Result<Vec<Sample>, Error> {
    let batch = config.max_batch_size > 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    config
        .model_warmup
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let at = format!("model_warmup[{i}] '{}'", w.name);
            let mut names: Vec<&String> = w.inputs.keys().collect();
            names.sort();
            let inputs = names
                .into_iter()
                .map(|name| {
                    let input = &w.inputs[name];
                    let field = format!("{at}: input '{name}'");
                    let datatype =
                        DataType::from_config_value(input.data_type).ok_or_else(|| {
                            Error::Load(format!("{field}: data_type is missing or invalid"))
                        })?;
                    let mut shape = input.dims.clone();
                    if batch {
                        shape.insert(0, i64::from(w.batch_size.max(1)));
                    }
                    if shape.iter().any(|&d| !(0..=1 << 24).contains(&d)) {
                        return Err(Error::Load(format!(
                            "{field}: dims {shape:?} must be fixed and at most 2^24 each"
                        )));
                    }
                    let count = shape.iter().product::<i64>() as usize;
                    let data = data(
                        &field,
                        datatype,
                        count,
                        input.input_data_type.as_ref(),
                        model_dir,
                        &mut seed,
                    )?;
                    Ok(Tensor {
                        name: name.clone(),
                        datatype,
                        shape,
                        data,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            Ok(Sample {
                name: w.name.clone(),
                inputs,
                count: w.count.max(1),
            })
        })
        .collect()
}

fn data(
    field: &str,
    datatype: DataType,
    count: usize,
    kind: Option<&InputDataType>,
    model_dir: &Path,
    seed: &mut u64,
) -> Result<TensorData, Error> {
    let size = datatype.size();
    Ok(match (kind, size) {
        (Some(InputDataType::ZeroData(true)), Some(size)) => {
            TensorData::Fixed(vec![0u8; count * size].into())
        }
        (Some(InputDataType::ZeroData(true)), None) => {
            TensorData::Strings(vec![bytes::Bytes::new(); count])
        }
        (Some(InputDataType::RandomData(true)), Some(size)) => {
            TensorData::Fixed(random(datatype, count * size, seed).into())
        }
        (Some(InputDataType::RandomData(true)), None) => {
            TensorData::Strings(vec![bytes::Bytes::from_static(b"warmup"); count])
        }
        (Some(InputDataType::InputDataFile(file)), _) => {
            let name = Path::new(file);
            if name.components().count() != 1 || file.starts_with('.') {
                return Err(Error::Load(format!(
                    "{field}: input_data_file '{file}' must name a file in the model's warmup/ directory"
                )));
            }
            let path = model_dir.join("warmup").join(name);
            let raw = std::fs::read(&path).map_err(|e| {
                Error::Load(format!("{field}: cannot read {}: {e}", path.display()))
            })?;
            match size {
                Some(size) if raw.len() == count * size => TensorData::Fixed(raw.into()),
                Some(size) => {
                    return Err(Error::Load(format!(
                        "{field}: {} has {} bytes; expected {} ({count} elements of {size} bytes)",
                        path.display(),
                        raw.len(),
                        count * size
                    )))
                }
                None => TensorData::Strings(strings(field, &raw, count)?),
            }
        }
        _ => {
            return Err(Error::Load(format!(
                "{field}: expected zero_data: true, random_data: true or input_data_file"
            )))
        }
    })
}

/// Random bytes; for floating types, values in [0, 1) (random bits would make NaNs).
fn random(datatype: DataType, n: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        // xorshift64*: warmup data needs no more than this.
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let unit = |r: u64| (r >> 11) as f64 / (1u64 << 53) as f64;
    match datatype {
        DataType::F32 => (0..n / 4)
            .flat_map(|_| (unit(next()) as f32).to_le_bytes())
            .collect(),
        DataType::F64 => (0..n / 8)
            .flat_map(|_| unit(next()).to_le_bytes())
            .collect(),
        DataType::F16 => (0..n / 2)
            .flat_map(|_| half::f16::from_f64(unit(next())).to_le_bytes())
            .collect(),
        DataType::BF16 => (0..n / 2)
            .flat_map(|_| half::bf16::from_f64(unit(next())).to_le_bytes())
            .collect(),
        DataType::Bool => (0..n).map(|_| (next() & 1) as u8).collect(),
        _ => (0..n).map(|_| next() as u8).collect(),
    }
}

/// BYTES elements as the wire carries them: a u32 little-endian length, then the bytes.
fn strings(field: &str, raw: &[u8], count: usize) -> Result<Vec<bytes::Bytes>, Error> {
    let mut out = Vec::with_capacity(count.min(raw.len() / 4 + 1));
    let mut rest = raw;
    while out.len() < count {
        let bad = || {
            Error::Load(format!(
                "{field}: the file holds fewer than {count} length-prefixed BYTES elements"
            ))
        };
        let len = rest.get(..4).ok_or_else(bad)?;
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let body = rest.get(4..4 + len).ok_or_else(bad)?;
        out.push(bytes::Bytes::copy_from_slice(body));
        rest = &rest[4 + len..];
    }
    Ok(out)
}
