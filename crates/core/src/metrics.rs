//! Prometheus exposition over HTTP (`GET /metrics`) for a registry the server fills, and
//! the latency buckets every infermesh histogram shares.

use std::{convert::Infallible, future::Future, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;

/// Seconds, from 25 µs to 10 s: the gateway hop is tens of µs, a cold batch seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 10.0,
];

/// A series by the result of what it counts (a load's `ok`/`failed`, a request's hit).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// A series by a reason key (`infermesh_core::Reason`), e.g. a load's refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// The label value for anything a client named that the server does not know (a model,
/// a tenant), so request contents cannot mint new series.
pub const UNKNOWN: &str = "(unknown)";

/// The model label of a request: its name when the server has (or a worker lists) the
/// model, else [`UNKNOWN`].
pub fn model_label(name: &str, known: bool) -> String {
    if known {
        name.to_string()
    } else {
        UNKNOWN.into()
    }
}

/// One request's metrics: `record(code, version, elapsed)` runs once, when the request
/// finishes, or with CANCELLED when its future is dropped first (the client went away or
/// its deadline passed), so no request goes uncounted.
pub struct RequestRecord<F: FnMut(tonic::Code, &str, std::time::Duration)> {
    start: std::time::Instant,
    record: F,
    done: bool,
}

impl<F: FnMut(tonic::Code, &str, std::time::Duration)> RequestRecord<F> {
    pub fn new(record: F) -> Self {
        Self {
            start: std::time::Instant::now(),
            record,
            done: false,
        }
    }

    pub fn start(&self) -> std::time::Instant {
        self.start
    }

    pub fn finish(&mut self, code: tonic::Code, version: &str) {
        if !std::mem::replace(&mut self.done, true) {
            (self.record)(code, version, self.start.elapsed());
        }
    }
}

impl<F: FnMut(tonic::Code, &str, std::time::Duration)> Drop for RequestRecord<F> {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled, "");
    }
}

/// How long a metrics client has to send its request headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `registry` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            conn = listener.accept() => match conn {
                Ok(c) => c,
                Err(e) => {
                    // At the fd limit accept fails at once: pause rather than spin.
                    tracing::warn!(error = %e, "metrics accept failed; pausing 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry)) }
            });
            // A scraper sends its request at once; one that trickles headers is dropped.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(
                b"not found; metrics are at /metrics\n",
            )))
            .expect("static response");
    }
    let mut text = String::new();
    if let Err(e) = encode(&mut text, registry) {
        return Response::builder()
            .status(500)
            .body(Full::new(Bytes::from(format!(
                "encoding metrics failed: {e}\n"
            ))))
            .expect("static response");
    }
    Response::builder()
        .header(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Full::new(Bytes::from(text)))
        .expect("static response")
}
