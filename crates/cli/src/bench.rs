//! `infermesh bench engine`: ONNX Runtime alone, in-process (no network, no queue), the
//! ceiling the worker is measured against. (`infermesh bench` itself, the load generator,
//! is in `load.rs`.)

use std::{path::PathBuf, time::Instant};

use anyhow::Context;
use infermesh_core::{Tensor, TensorData};
use infermesh_worker::engine::{
    onnx::{self, DeviceRequest, OnnxEngine, SessionOptions},
    Engine,
};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<What>,
    #[command(flatten)]
    pub load: crate::load::LoadArgs,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// Run a model's engine directly at several batch sizes and print samples/s.
    Engine(EngineArgs),
}

#[derive(clap::Args)]
pub struct EngineArgs {
    /// The model file.
    #[arg(long, default_value = "models/mlp/1/model.onnx")]
    pub model: PathBuf,
    /// Batch sizes to try.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch_sizes: Vec<usize>,
    /// ONNX Runtime intra-op threads (0: one per core), as the worker's flag.
    #[arg(long, default_value_t = 0)]
    pub intra_op_threads: usize,
    /// Let pool threads spin between runs (ONNX Runtime's default, its best case alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub spinning: bool,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// ONNX Runtime library (default: as the worker finds it).
    #[arg(long, env = "INFERMESH_ONNXRUNTIME_LIB")]
    pub onnxruntime_lib: Option<PathBuf>,
    /// Print one JSON line per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        Some(What::Engine(engine)) => {
            tokio::task::spawn_blocking(move || run_engine(engine)).await?
        }
        None => crate::load::run(args.load).await,
    }
}

fn run_engine(args: EngineArgs) -> anyhow::Result<()> {
    let lib = match &args.onnxruntime_lib {
        Some(p) => p.clone(),
        None => onnx::default_library_candidates()
            .into_iter()
            .find(|p| p.is_file())
            .context("ONNX Runtime library not found; run scripts/fetch-ort.sh")?,
    };
    onnx::init(&lib)?;
    let opts = SessionOptions {
        device: DeviceRequest::Cpu,
        intra_op_threads: args.intra_op_threads,
        spinning: args.spinning,
    };
    let (mut engine, graph) = OnnxEngine::load(&args.model, &opts)?;
    let outputs: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    if !args.json {
        println!("| batch | samples/s | batch p50 ms | batch p99 ms |");
        println!("|---:|---:|---:|---:|");
    }
    for &batch in &args.batch_sizes {
        let inputs: Vec<Tensor> = graph
            .inputs
            .iter()
            .map(|io| {
                let shape: Vec<i64> = io
                    .dims
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if i == 0 && d < 0 {
                            batch as i64
                        } else {
                            d.max(1)
                        }
                    })
                    .collect();
                let n = shape.iter().product::<i64>() as usize;
                let size = io
                    .datatype
                    .size()
                    .context("bench engine takes fixed-size inputs")?;
                // A smooth pattern of small values: finite outputs, no denormals.
                let data: Vec<u8> = (0..n)
                    .flat_map(|i| ((i % 97) as f32 / 97.0).to_le_bytes())
                    .take(n * size)
                    .collect();
                Ok(Tensor {
                    name: io.name.clone(),
                    datatype: io.datatype,
                    shape,
                    data: TensorData::Fixed(data.into()),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        for _ in 0..3 {
            engine.run(&inputs, &outputs)?; // warm-up
        }
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < args.seconds {
            let t = Instant::now();
            engine.run(&inputs, &outputs)?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        let rate = (lat.len() * batch) as f64 / secs;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"batch": batch, "samples_per_s": rate, "p50_ms": pct(0.5), "p99_ms": pct(0.99)})
            );
        } else {
            println!(
                "| {batch} | {rate:.0} | {:.3} | {:.3} |",
                pct(0.5),
                pct(0.99)
            );
        }
    }
    Ok(())
}
