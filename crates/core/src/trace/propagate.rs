//! W3C trace context in and out of a call: from and to gRPC metadata, and from and to a
//! request's `parameters` (`traceparent`, `tracestate`), which is how the gateway passes a
//! context per message over a stream it shares between messages.

use std::collections::HashMap;

use infermesh_proto as pb;
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, TraceContextExt, TraceFlags},
    Context,
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{IdGenerator, RandomIdGenerator},
};
use pb::infer_parameter::ParameterChoice;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Extract<'a>(&'a MetadataMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct Inject<'a>(&'a mut MetadataMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

type Parameters = HashMap<String, pb::InferParameter>;

struct FromParameters<'a>(&'a Parameters);

impl Extractor for FromParameters<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.get(key)?.parameter_choice.as_ref()? {
            ParameterChoice::StringParam(s) => Some(s),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct ToParameters<'a>(&'a mut Parameters);

impl Injector for ToParameters<'_> {
    fn set(&mut self, key: &str, value: String) {
        let param = pb::InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(value)),
        };
        self.0.insert(key.to_string(), param);
    }
}

/// The caller's trace context from `traceparent`/`tracestate` metadata (empty if none).
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&Extract(metadata))
}

/// The context a stream message carries in its own `traceparent` parameter, if any (only
/// read when traces are on).
pub fn from_parameters(parameters: &Parameters) -> Option<Context> {
    if super::SAMPLER.get().is_none() || !parameters.contains_key("traceparent") {
        return None;
    }
    Some(TraceContextPropagator::new().extract(&FromParameters(parameters)))
}

/// What a request passes on to the next hop when it has no span of its own: its trace,
/// marked not sampled.
#[derive(Clone, Default)]
pub struct Carry(pub(super) Option<SpanContext>);

impl Carry {
    /// Writes the context the next hop continues into an outgoing call's metadata: `child`'s
    /// (a span of this request) when there is one, else the unsampled context.
    pub fn inject(&self, child: &Span, metadata: &mut MetadataMap) {
        if let Some(cx) = self.outgoing(child) {
            TraceContextPropagator::new().inject_context(&cx, &mut Inject(metadata));
        }
    }

    /// As [`Carry::inject`], into a request's parameters (a message on a shared stream).
    pub fn inject_parameters(&self, child: &Span, parameters: &mut Parameters) {
        if let Some(cx) = self.outgoing(child) {
            TraceContextPropagator::new().inject_context(&cx, &mut ToParameters(parameters));
        }
    }

    fn outgoing(&self, child: &Span) -> Option<Context> {
        if !child.is_disabled() {
            return Some(child.context());
        }
        let sc = self.0.as_ref()?;
        let sc = SpanContext::new(
            sc.trace_id(),
            RandomIdGenerator::default().new_span_id(),
            TraceFlags::default(),
            false,
            sc.trace_state().clone(),
        );
        Some(Context::new().with_remote_span_context(sc))
    }
}
