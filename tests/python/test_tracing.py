"""OpenTelemetry traces across the hop: a real OTLP/gRPC receiver in the test, a gateway and
a worker exporting to it, and tritonclient sending a W3C traceparent."""
import queue
import secrets
import socket
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import Gateway, Worker


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP collector that keeps every span it is sent, with its service.name."""

    def __init__(self):
        self.spans = queue.Queue()
        self.other = []  # spans wait_for passed over (other traces)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.put((attrs.get("service.name"), span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, trace_id: bytes, want, timeout=30.0):
        """Spans of one trace, collected until `want(spans)` holds (or the time is up)."""
        got, deadline = [], time.monotonic() + timeout
        while not want(got):
            left = deadline - time.monotonic()
            assert left > 0, f"spans seen for the trace: {[(s, sp.name) for s, sp in got]}"
            try:
                service, span = self.spans.get(timeout=left)
            except queue.Empty:
                continue
            if span.trace_id == trace_id:
                got.append((service, span))
            else:
                self.other.append((service, span))
        return got

    def other_traces(self, than: bytes):
        """Trace ids of every span received so far that is not of trace `than`."""
        while not self.spans.empty():
            self.other.append(self.spans.get())
        return {s.trace_id for _, s in self.other if s.trace_id != than}


@pytest.fixture(scope="module")
def traced():
    """Receiver, worker (configured by the standard OTEL_* variables) and gateway (by flags)."""
    rx = Receiver()
    endpoint = f"http://127.0.0.1:{rx.port}"
    worker = Worker("--intra-op-threads", "1", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "test-worker",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_BSP_SCHEDULE_DELAY": "50"})
    gateway = Gateway(worker, extra=["--otel-endpoint", endpoint, "--otel-service-name", "test-gateway",
                                     "--otel-schedule-delay-ms", "50"])
    yield rx, gateway, worker
    assert gateway.stop() == 0
    assert worker.stop() == 0
    rx.server.stop(0)


def digits_input():
    i = grpcclient.InferInput("input", [1, 64], "FP32")
    i.set_data_from_numpy(np.zeros((1, 64), np.float32))
    return i


def traceparent(sampled=True):
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    header = f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"
    return trace_id, span_id, header


def by_name(spans, service, name):
    return [s for svc, s in spans if svc == service and s.name == name]


def names(spans):
    return {(svc, s.name) for svc, s in spans}


# The gateway forwards requests to workers as messages of a stream it keeps open.
FORWARDED = "ModelStreamInfer"
EXPECTED = {("test-gateway", "ModelInfer"), ("test-gateway", "route"), ("test-gateway", "forward"),
            ("test-worker", FORWARDED), ("test-worker", "queue"), ("test-worker", "execute"),
            ("test-worker", "response")}


def test_one_trace_from_client_through_gateway_to_worker(traced):
    rx, gateway, _ = traced
    trace_id, client_span, header = traceparent()
    gateway.client.infer("digits", [digits_input()], headers={"traceparent": header})
    spans = rx.wait_for(trace_id, lambda got: EXPECTED <= names(got))

    (g_req,) = by_name(spans, "test-gateway", "ModelInfer")
    (route,) = by_name(spans, "test-gateway", "route")
    (fwd,) = by_name(spans, "test-gateway", "forward")
    (w_req,) = by_name(spans, "test-worker", FORWARDED)
    (queue_span,) = by_name(spans, "test-worker", "queue")
    (execute,) = by_name(spans, "test-worker", "execute")
    (response,) = by_name(spans, "test-worker", "response")
    # client -> gateway request -> route / forward -> worker request -> queue / execute / response
    assert g_req.parent_span_id == client_span
    assert g_req.kind == g_req.SPAN_KIND_SERVER
    assert route.parent_span_id == g_req.span_id and fwd.parent_span_id == g_req.span_id
    assert fwd.kind == fwd.SPAN_KIND_CLIENT
    assert w_req.parent_span_id == fwd.span_id
    assert w_req.kind == w_req.SPAN_KIND_SERVER
    assert queue_span.parent_span_id == w_req.span_id
    assert execute.parent_span_id == w_req.span_id
    assert response.parent_span_id == w_req.span_id
    # The batch links to every request it served (here: this one).
    assert [link.span_id for link in execute.links] == [w_req.span_id]
    attrs = {a.key: a.value for a in w_req.attributes}
    assert attrs["model"].string_value == "digits"
    assert attrs["rpc.grpc.status_code"].int_value == 0


def test_stream_messages_are_spans_of_the_streams_trace(traced):
    rx, gateway, _ = traced
    trace_id, client_span, header = traceparent()
    done = queue.Queue()
    c = grpcclient.InferenceServerClient(gateway.url)
    c.start_stream(callback=lambda result, error: done.put(error), headers={"traceparent": header})
    for n in range(3):
        c.async_stream_infer("digits", [digits_input()], request_id=str(n))
    assert [done.get(timeout=30) for _ in range(3)] == [None] * 3
    c.stop_stream()
    c.close()
    # The gateway forwards messages over streams of its own, each message with its context.
    spans = rx.wait_for(trace_id, lambda got: len(by_name(got, "test-worker", "ModelStreamInfer")) == 3
                        and len(by_name(got, "test-gateway", "ModelStreamInfer")) == 3)
    messages = by_name(spans, "test-gateway", "ModelStreamInfer")
    assert len(messages) == 3
    assert all(m.parent_span_id == client_span for m in messages)
    forwards = by_name(spans, "test-gateway", "forward")
    assert {f.parent_span_id for f in forwards} == {m.span_id for m in messages}
    workers = by_name(spans, "test-worker", "ModelStreamInfer")
    assert {w.parent_span_id for w in workers} == {f.span_id for f in forwards}


def test_a_failed_request_is_an_error_span(traced):
    rx, gateway, _ = traced
    trace_id, _, header = traceparent()
    bad = grpcclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(grpcclient.InferenceServerException):
        gateway.client.infer("digits", [bad], headers={"traceparent": header})
    spans = rx.wait_for(trace_id, lambda got: {("test-gateway", "ModelInfer"), ("test-worker", FORWARDED)} <= names(got))
    for service, name in (("test-gateway", "ModelInfer"), ("test-worker", FORWARDED)):
        (span,) = by_name(spans, service, name)
        assert span.status.code == span.status.STATUS_CODE_ERROR
        assert "input" in span.status.message
        attrs = {a.key: a.value for a in span.attributes}
        assert attrs["rpc.grpc.status_code"].int_value == 3  # INVALID_ARGUMENT


def test_an_unsampled_caller_is_not_traced(traced):
    """Parent-based sampling: a traceparent with the sampled flag off is honoured."""
    rx, gateway, _ = traced
    quiet, _, header = traceparent(sampled=False)
    gateway.client.infer("digits", [digits_input()], headers={"traceparent": header})
    # A sampled request sent after it: once its spans are in, the quiet one's would be too.
    marker, _, header = traceparent()
    gateway.client.infer("digits", [digits_input()], headers={"traceparent": header})
    rx.wait_for(marker, lambda got: EXPECTED <= names(got))
    assert quiet not in rx.other_traces(marker)


def dropped_spans(server):
    port = server.metrics_url.rsplit(":", 1)[1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("infermesh_trace_spans_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("infermesh_trace_spans_dropped_total not exported")


def test_a_black_hole_collector_costs_spans_not_requests():
    """A collector that accepts connections and never answers: every request still meets
    its deadline, and the spans that could not be sent are counted as dropped."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(128)  # the kernel completes handshakes; nobody ever reads
    endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "300", "OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    worker = Worker("--otel-endpoint", endpoint, env=env)
    gateway = Gateway(worker, extra=["--otel-endpoint", endpoint], env=env)
    try:
        for _ in range(200):
            r = gateway.client.infer("digits", [digits_input()], client_timeout=2.0)
            assert r.as_numpy("label").shape == (1,)
        deadline = time.monotonic() + 30
        while min(dropped_spans(gateway), dropped_spans(worker)) == 0:
            assert time.monotonic() < deadline, "no span was counted as dropped"
            time.sleep(0.1)
    finally:
        assert gateway.stop() == 0
        assert worker.stop() == 0
        hole.close()


def test_the_gateways_decision_not_to_sample_reaches_the_worker():
    """The gateway samples nothing of its own (ratio 0) and the worker would sample every
    root: requests without a traceparent still produce no spans anywhere, because the
    gateway passes its "not sampled" decision on. A caller's sampled traceparent still
    wins (parent-based), which is how the test knows everything before it has arrived."""
    rx = Receiver()
    endpoint = f"http://127.0.0.1:{rx.port}"
    fast = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
    worker = Worker("--otel-endpoint", endpoint, env=fast)  # parentbased_always_on: every root sampled
    gateway = Gateway(worker, extra=["--otel-endpoint", endpoint, "--otel-sampler", "parentbased_traceidratio",
                                     "--otel-sampler-arg", "0"], env=fast)
    try:
        for _ in range(20):
            gateway.client.infer("digits", [digits_input()])
        marker, _, header = traceparent()
        gateway.client.infer("digits", [digits_input()], headers={"traceparent": header})
        rx.wait_for(marker, lambda got: {("infermesh-gateway", "ModelInfer"), ("infermesh-worker", FORWARDED)}
                    <= names(got))
        assert rx.other_traces(marker) == set(), {(svc, s.name, s.parent_span_id.hex()) for svc, s in rx.other}
    finally:
        assert gateway.stop() == 0
        assert worker.stop() == 0
        rx.server.stop(0)


def test_spans_still_queued_are_sent_when_the_worker_stops():
    """With the default 5 s batching delay, a request's spans are still queued when SIGTERM
    arrives: the worker sends them before it exits."""
    rx = Receiver()
    worker = Worker("--otel-endpoint", f"http://127.0.0.1:{rx.port}")
    trace_id, _, header = traceparent()
    worker.client.infer("digits", [digits_input()], headers={"traceparent": header})
    assert worker.stop() == 0
    try:
        spans = rx.wait_for(trace_id, lambda got: ("infermesh-worker", "ModelInfer") in names(got), timeout=5)
        assert {"ModelInfer", "queue", "execute", "response"} <= {s.name for _, s in spans}
    finally:
        rx.server.stop(0)
