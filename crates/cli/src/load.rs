//! `infermesh bench`: a load generator speaking the KServe v2 protocol, unary or over one
//! bidi stream, with real input data. Cheap on purpose: it shares the cores with the
//! servers it measures, so it keeps one HTTP/2 connection and no per-request allocation
//! beyond the request itself.

use std::{
    collections::{BTreeMap, VecDeque},
    io::IsTerminal,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::StreamExt;
use infermesh_core::DataType;
use infermesh_proto::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, ModelInferRequest, ModelMetadataRequest,
};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[derive(clap::Args, Clone)]
pub struct LoadArgs {
    /// Server address (a worker or the gateway).
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    /// Model name.
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Inputs as NAME=JSON or NAME=@FILE; by default each input is filled with a smooth
    /// pattern of the model's datatype and shape.
    #[arg(long = "input", value_name = "NAME=JSON|@FILE")]
    pub inputs: Vec<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Stop after this many requests (default 10000 unless --duration is given).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop after this long instead, e.g. 10s.
    #[arg(long, value_parser = infermesh_core::config::parse_duration)]
    pub duration: Option<Duration>,
    /// Rows per request (the batch dim) for generated inputs.
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// Send every request over one ModelStreamInfer stream instead of unary calls.
    #[arg(long)]
    pub streaming: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What the run saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let channel = crate::conn::connect(&args.url, &args.conn).await?;
    let client = GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let request = build_request(&mut client.clone(), &args).await?;
    let limit = match (args.requests, args.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => 10_000,
    };
    let stop_at = args.duration.map(|d| Instant::now() + d);
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let progress = (std::io::stderr().is_terminal() && !args.json)
        .then(|| spawn_progress(done.clone(), limit));

    let start = Instant::now();
    if args.streaming {
        stream_load(client, request, &args, limit, stop_at, &done, &tally).await?;
    } else {
        let tasks: Vec<_> = (0..args.concurrency.max(1))
            .map(|_| {
                let (mut client, request) = (client.clone(), request.clone());
                let (issued, done, tally) = (issued.clone(), done.clone(), tally.clone());
                tokio::spawn(async move {
                    let mut local = Tally::default();
                    while issued.fetch_add(1, Ordering::Relaxed) < limit
                        && stop_at.is_none_or(|t| Instant::now() < t)
                    {
                        let t = Instant::now();
                        match client.model_infer(request.clone()).await {
                            Ok(_) => local.latencies_us.push(t.elapsed().as_micros() as u32),
                            Err(s) => {
                                *local.errors.entry(format!("{:?}", s.code())).or_default() += 1
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut all = tally.lock().expect("tally lock");
                    all.latencies_us.extend(local.latencies_us);
                    for (k, v) in local.errors {
                        *all.errors.entry(k).or_default() += v;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let mut tally = Arc::try_unwrap(tally)
        .ok()
        .expect("tasks done")
        .into_inner()
        .expect("tally lock");
    report(&args, &mut tally, elapsed);
    Ok(())
}

/// One stream, `concurrency` requests in flight; responses come back in request order,
/// so send times queue up in order too.
async fn stream_load(
    mut client: GrpcInferenceServiceClient<crate::conn::Conn>,
    request: ModelInferRequest,
    args: &LoadArgs,
    limit: u64,
    stop_at: Option<Instant>,
    done: &AtomicU64,
    tally: &Mutex<Tally>,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let (tx, rx) = tokio::sync::mpsc::channel(args.concurrency.max(1));
    let sender = {
        let (permits, sent) = (permits.clone(), sent.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while n < limit && stop_at.is_none_or(|t| Instant::now() < t) {
                let Ok(p) = permits.clone().acquire_owned().await else {
                    break;
                };
                p.forget();
                let mut r = request.clone();
                r.id = n.to_string();
                sent.lock().expect("sent lock").push_back(Instant::now());
                if tx.send(r).await.is_err() {
                    break;
                }
                n += 1;
            }
        })
    };
    let mut responses = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening the stream")?
        .into_inner();
    while let Some(item) = responses.next().await {
        let t = sent.lock().expect("sent lock").pop_front();
        let mut all = tally.lock().expect("tally lock");
        match item {
            Ok(m) if m.error_message.is_empty() => {
                all.latencies_us
                    .extend(t.map(|t| t.elapsed().as_micros() as u32));
            }
            Ok(m) => *all.errors.entry(m.error_message).or_default() += 1,
            Err(s) => {
                *all.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                break;
            }
        }
        drop(all);
        done.fetch_add(1, Ordering::Relaxed);
        permits.add_permits(1);
    }
    sender.abort();
    Ok(())
}

async fn build_request(
    client: &mut GrpcInferenceServiceClient<crate::conn::Conn>,
    args: &LoadArgs,
) -> anyhow::Result<ModelInferRequest> {
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: args.model.clone(),
            version: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("model metadata: {}: {}", s.code(), s.message()))?
        .into_inner();
    let given: BTreeMap<&str, &str> = args
        .inputs
        .iter()
        .filter_map(|s| s.split_once('='))
        .collect();
    let mut req = ModelInferRequest {
        model_name: args.model.clone(),
        ..Default::default()
    };
    for info in &meta.inputs {
        let dt = DataType::parse(&info.datatype)
            .with_context(|| format!("datatype {}", info.datatype))?;
        let (shape, raw) = match given.get(info.name.as_str()) {
            Some(text) => {
                let text = match text.strip_prefix('@') {
                    Some(path) => {
                        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
                    }
                    None => text.to_string(),
                };
                crate::json::encode(&info.name, dt, &serde_json::from_str(&text)?)?
            }
            None => {
                let shape: Vec<i64> = info
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if i == 0 && d < 0 {
                            args.batch
                        } else {
                            d.max(1)
                        }
                    })
                    .collect();
                let n = shape.iter().product::<i64>() as usize;
                let values: Vec<Value> = (0..n)
                    .map(|i| match dt {
                        DataType::Bytes => json!("x"),
                        DataType::Bool => json!(i % 2 == 0),
                        DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64 => {
                            json!((i % 97) as f64 / 97.0)
                        }
                        _ => json!(i % 7),
                    })
                    .collect();
                let (_, raw) = crate::json::encode(&info.name, dt, &Value::Array(values))?;
                (shape, raw)
            }
        };
        req.inputs.push(InferInputTensor {
            name: info.name.clone(),
            datatype: info.datatype.clone(),
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(raw);
    }
    Ok(req)
}

fn spawn_progress(done: Arc<AtomicU64>, limit: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let n = done.load(Ordering::Relaxed);
            let rate = n as f64 / start.elapsed().as_secs_f64();
            let of = if limit == u64::MAX {
                String::new()
            } else {
                format!(" / {limit}")
            };
            eprint!("\r{n}{of} requests, {rate:.0}/s   ");
        }
    })
}

fn report(args: &LoadArgs, tally: &mut Tally, elapsed: f64) {
    tally.latencies_us.sort_unstable();
    let ok = tally.latencies_us.len();
    let pct = |p: f64| -> f64 {
        if ok == 0 {
            return 0.0;
        }
        tally.latencies_us[((ok - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    let errors: u64 = tally.errors.values().sum();
    let rate = ok as f64 / elapsed;
    let summary = json!({
        "url": args.url, "model": args.model, "mode": if args.streaming { "stream" } else { "unary" },
        "concurrency": args.concurrency, "batch": args.batch, "seconds": elapsed,
        "ok": ok, "errors": errors, "errors_by_status": tally.errors,
        "requests_per_s": rate, "inferences_per_s": rate * args.batch as f64,
        "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": pct(1.0),
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!(
        "{} {} c={}: {ok} ok, {errors} errors in {elapsed:.2}s = {rate:.0} req/s ({:.0} infer/s)",
        args.model,
        summary["mode"].as_str().unwrap_or(""),
        args.concurrency,
        rate * args.batch as f64
    );
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    for (status, n) in &tally.errors {
        println!("  {n} × {status}");
    }
}
