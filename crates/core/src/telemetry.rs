//! Log and trace setup: human-readable text by default, JSON for pipelines, filtered by
//! RUST_LOG; OpenTelemetry spans alongside when a collector is configured (see `trace`).

use std::io::IsTerminal;

use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::trace::{self, Tracing};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: logs to stderr and, with `tracing`, spans to the
/// collector. Safe to call twice (tests): the second call is a no-op.
pub fn init(format: LogFormat, tracing: Option<&Tracing>) {
    // ONNX Runtime logs every allocation at info; keep its warnings and errors only.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    // Request spans are for the collector only: formatting them for every request would
    // cost each request a few allocations that nobody reads.
    let filter = filter.add_directive(
        format!("{}=off", trace::TARGET)
            .parse()
            .expect("a valid directive"),
    );
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(tracing.map(|t| t.layer()))
        .try_init();
}

/// Logs only (tools and tests).
pub fn init_logging(format: LogFormat) {
    init(format, None);
}

/// What a server's `main` calls: logs, plus spans when `--otel-endpoint` (or
/// OTEL_EXPORTER_OTLP_ENDPOINT) is set. Call inside the runtime; keep the result and
/// [`Tracing::shutdown`] it after the server stops so queued spans are sent.
pub fn init_server(args: &crate::config::ServerArgs, service: &str) -> Option<Tracing> {
    let (pipeline, error) = match Tracing::new(&args.trace, service) {
        Ok(t) => (t, None),
        Err(e) => (None, Some(e)),
    };
    init(args.log_format, pipeline.as_ref());
    crate::panic::install_hook();
    if let Some(e) = error {
        tracing::warn!(error = %e, "OpenTelemetry export is off");
    } else if let Some(endpoint) = &args.trace.otel_endpoint {
        tracing::info!(%endpoint, sampler = ?args.trace.otel_sampler, ratio = args.trace.otel_sampler_arg, "exporting spans over OTLP/gRPC");
    }
    pipeline
}
