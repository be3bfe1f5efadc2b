//! OpenTelemetry traces: OTLP/gRPC export configured by the standard `OTEL_*` variables,
//! W3C `traceparent` read from incoming gRPC metadata and written into outgoing calls.
//!
//! The sampler decides once per request, where the request arrives ([`request`]): a request
//! that is not sampled gets no spans at all (building and then discarding them cost a
//! quarter of the throughput at 1% sampling), and its context, marked not sampled, still
//! goes on to the next hop so that hop decides the same. Request spans use the target
//! [`TARGET`], which only the OpenTelemetry layer listens to: with no collector configured
//! they are disabled where they are created. Export never blocks a request: finished spans
//! go into a bounded queue that one task drains; when the queue is full or the collector
//! fails or is too slow, spans are dropped and counted
//! (`infermesh_trace_spans_dropped_total`).

use std::{
    sync::{LazyLock, OnceLock},
    time::{Duration, Instant},
};

use opentelemetry::{
    trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceState, TracerProvider as _},
    Context,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    trace::{
        IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracerProvider, ShouldSample,
        SpanData, SpanExporter as _, SpanProcessor,
    },
    Resource,
};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

mod propagate;
pub use propagate::{extract, from_parameters, Carry};

/// The `tracing` target of request spans (only the OpenTelemetry layer sees it).
pub const TARGET: &str = "infermesh::otel";

/// Largest batch sent to the collector in one export call.
const MAX_EXPORT_BATCH: usize = 512;

/// Where spans go and which are kept; the standard OpenTelemetry variables, or flags.
#[derive(clap::Args, Clone, Debug)]
pub struct TraceArgs {
    /// OTLP/gRPC collector (e.g. http://otel-collector:4317). Unset: no spans are made.
    #[arg(long = "otel-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_endpoint: Option<String>,

    /// service.name of the exported spans (default: the binary's name).
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off or parentbased_traceidratio.
    #[arg(
        long = "otel-sampler",
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub otel_sampler: SamplerKind,

    /// The ratio for the *traceidratio samplers, 0.0 to 1.0.
    #[arg(
        long = "otel-sampler-arg",
        env = "OTEL_TRACES_SAMPLER_ARG",
        default_value_t = 1.0
    )]
    pub otel_sampler_arg: f64,

    /// Milliseconds one export call may take before its spans are dropped.
    #[arg(
        long = "otel-export-timeout-ms",
        env = "OTEL_EXPORTER_OTLP_TIMEOUT",
        default_value_t = 10_000
    )]
    pub otel_export_timeout_ms: u64,

    /// Milliseconds a finished span may wait for others to be sent with it.
    #[arg(
        long = "otel-schedule-delay-ms",
        env = "OTEL_BSP_SCHEDULE_DELAY",
        default_value_t = 5000
    )]
    pub otel_schedule_delay_ms: u64,

    /// Finished spans held while waiting for the collector; more are dropped.
    #[arg(
        long = "otel-max-queue-size",
        env = "OTEL_BSP_MAX_QUEUE_SIZE",
        default_value_t = 2048
    )]
    pub otel_max_queue_size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SamplerKind {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

impl TraceArgs {
    fn sampler(&self) -> Sampler {
        let ratio = self.otel_sampler_arg.clamp(0.0, 1.0);
        let parent = |s| Sampler::ParentBased(Box::new(s));
        match self.otel_sampler {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::Traceidratio => Sampler::TraceIdRatioBased(ratio),
            SamplerKind::ParentbasedAlwaysOn => parent(Sampler::AlwaysOn),
            SamplerKind::ParentbasedAlwaysOff => parent(Sampler::AlwaysOff),
            SamplerKind::ParentbasedTraceidratio => parent(Sampler::TraceIdRatioBased(ratio)),
        }
    }
}

/// The configured sampler, set when export is on; [`request`] asks it once per request.
static SAMPLER: OnceLock<Sampler> = OnceLock::new();

/// Span counts for /metrics; process-wide because the tracer is.
pub struct SpanCounters {
    pub exported: Counter,
    pub dropped: Counter,
}

pub static SPANS: LazyLock<SpanCounters> = LazyLock::new(|| SpanCounters {
    exported: Counter::default(),
    dropped: Counter::default(),
});

/// Adds the span counters to a server's registry.
pub fn register(registry: &mut Registry) {
    registry.register(
        "infermesh_trace_spans_exported",
        "Spans the OTLP collector accepted",
        SPANS.exported.clone(),
    );
    registry.register(
        "infermesh_trace_spans_dropped",
        "Spans dropped because the export queue was full or the collector failed or timed out",
        SPANS.dropped.clone(),
    );
}

/// The tracer pipeline: build it inside the runtime, then install it as a layer.
pub struct Tracing {
    pub provider: SdkTracerProvider,
    stop: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

impl Tracing {
    /// Builds the exporter and its queue; `None` when no endpoint is configured.
    pub fn new(args: &TraceArgs, default_service: &str) -> Result<Option<Self>, String> {
        let Some(endpoint) = &args.otel_endpoint else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(args.otel_export_timeout_ms.max(1));
        let delay = Duration::from_millis(args.otel_schedule_delay_ms);
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(timeout)
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(
                args.otel_service_name
                    .clone()
                    .unwrap_or_else(|| default_service.to_string()),
            )
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(args.otel_max_queue_size.max(1));
        let (stop, stop_rx) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        tokio::spawn(async move {
            export_loop(exporter, rx, stop_rx, timeout, delay).await;
            let _ = done_tx.send(());
        });
        let _ = SAMPLER.set(args.sampler());
        // Spans exist only under requests the sampler kept (see `request`): keep them all.
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::AlwaysOn)
            .with_span_processor(QueueProcessor { tx })
            .build();
        Ok(Some(Self {
            provider,
            stop,
            done,
        }))
    }

    /// The `tracing` layer that turns [`TARGET`] spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        // A static filter (not a closure): callsites get a cached interest and a max level,
        // so the trace/debug events of h2, hyper and tokio stay free on the request path.
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target(TARGET, tracing::Level::INFO)
            .with_default(tracing::Level::WARN);
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("infermesh"))
            .with_filter(filter)
    }

    /// Exports what is queued (waiting at most `within`), then stops the exporter.
    pub async fn shutdown(self, within: Duration) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(within, self.done).await;
        let _ = self.provider.shutdown();
    }
}

/// Hands finished spans to the export task; never waits.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            SPANS.dropped.inc();
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// Sends whatever is queued, up to [`MAX_EXPORT_BATCH`] spans a call; batches form by
/// themselves while a call is out. A call that fails or outlasts `timeout` drops its spans.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
    timeout: Duration,
    delay: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_EXPORT_BATCH);
    let mut stopping = false;
    loop {
        if !stopping {
            // The first span starts the clock; a batch goes out when full or `delay` later.
            // (One call per span would cost the collector and both ends far more.)
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_EXPORT_BATCH) => if n == 0 { stopping = true },
                _ = &mut stop => stopping = true,
            }
            let until = tokio::time::Instant::now() + delay;
            while !stopping && batch.len() < MAX_EXPORT_BATCH {
                let room = MAX_EXPORT_BATCH - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => if n == 0 { stopping = true },
                    _ = tokio::time::sleep_until(until) => break,
                    _ = &mut stop => stopping = true,
                }
            }
        }
        if stopping {
            while batch.len() < MAX_EXPORT_BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
        }
        let n = batch.len() as u64;
        let sent = std::mem::replace(&mut batch, Vec::with_capacity(MAX_EXPORT_BATCH));
        let started = Instant::now();
        match tokio::time::timeout(timeout, exporter.export(sent)).await {
            Ok(Ok(())) => {
                SPANS.exported.inc_by(n);
            }
            Ok(Err(e)) => {
                SPANS.dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed");
            }
            Err(_) => {
                SPANS.dropped.inc_by(n);
                tracing::debug!(spans = n, waited = ?started.elapsed(), "span export timed out");
            }
        }
    }
}

/// The current request's span; disabled when the request is not traced (another
/// library's span being current does not count).
pub fn current() -> Span {
    let span = Span::current();
    match span.metadata() {
        Some(m) if m.target() == TARGET => span,
        _ => Span::none(),
    }
}

/// A child span of the current request: disabled when the request is not traced, so it
/// never becomes a root of its own.
#[macro_export]
macro_rules! child_span {
    ($($arg:tt)+) => {
        if $crate::trace::current().is_disabled() {
            tracing::Span::none()
        } else {
            tracing::info_span!(target: $crate::trace::TARGET, $($arg)+)
        }
    };
}

/// Records on `span` that it ran together with the work `other` stands for (a batch
/// links every request it served).
pub fn link(span: &Span, other: &Span) {
    if !span.is_disabled() && !other.is_disabled() {
        span.add_link(other.context().span().span_context().clone());
    }
}

/// The current span's trace id, for log lines inside a request ("" outside one).
pub fn trace_id() -> String {
    let span = current();
    if span.is_disabled() {
        return String::new();
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// The caller's context for a stream, read once when it opens; empty (and not parsed)
/// when no collector is configured.
pub fn incoming(metadata: &MetadataMap) -> Context {
    if SAMPLER.get().is_some() {
        extract(metadata)
    } else {
        Context::new()
    }
}

/// One inference request (or stream message) arriving with the caller's context `parent`:
/// the sampler decides here. Sampled: the request's server span, a child of `parent`.
/// Not sampled: no span, and the [`Carry`] that passes the decision on.
pub fn request(rpc: &'static str, model: &str, parent: Context) -> (Span, Carry) {
    let Some(sampler) = SAMPLER.get() else {
        return (Span::none(), Carry(None));
    };
    let remote = parent.span().span_context().clone();
    let trace_id = if remote.is_valid() {
        remote.trace_id()
    } else {
        RandomIdGenerator::default().new_trace_id()
    };
    let decision = sampler
        .should_sample(Some(&parent), trace_id, rpc, &SpanKind::Server, &[], &[])
        .decision;
    if decision != SamplingDecision::RecordAndSample {
        let carry = if remote.is_valid() {
            remote
        } else {
            let id = RandomIdGenerator::default().new_span_id();
            SpanContext::new(
                trace_id,
                id,
                TraceFlags::default(),
                true,
                TraceState::default(),
            )
        };
        return (Span::none(), Carry(Some(carry)));
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = rpc,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "inference.GRPCInferenceService",
        rpc.method = rpc,
        model = model,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let _ = span.set_parent(parent);
    }
    (span, Carry(None))
}

/// Records a request's outcome on its span (a failed request marks the span an error).
pub fn finish(span: &Span, status: Option<&tonic::Status>) {
    if span.is_disabled() {
        return;
    }
    match status {
        None => {
            span.record("rpc.grpc.status_code", 0);
        }
        Some(s) => {
            span.record("rpc.grpc.status_code", s.code() as i32);
            span.set_status(opentelemetry::trace::Status::error(s.message().to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{SamplerKind, TraceArgs};

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        trace: TraceArgs,
    }

    #[test]
    fn every_setting_has_a_flag_and_its_standard_otel_variable() {
        let envs: Vec<String> = Flags::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        for standard in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SERVICE_NAME",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "OTEL_BSP_SCHEDULE_DELAY",
            "OTEL_BSP_MAX_QUEUE_SIZE",
        ] {
            assert!(envs.iter().any(|e| e == standard), "{standard} missing");
        }
        let f = Flags::try_parse_from([
            "x",
            "--otel-endpoint",
            "http://127.0.0.1:4317",
            "--otel-sampler",
            "parentbased_traceidratio",
            "--otel-sampler-arg",
            "0.01",
        ])
        .expect("parses");
        assert_eq!(
            f.trace.otel_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(f.trace.otel_sampler, SamplerKind::ParentbasedTraceidratio);
        assert_eq!(f.trace.otel_sampler_arg, 0.01);
    }
}
