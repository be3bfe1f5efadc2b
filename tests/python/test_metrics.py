"""/metrics after real traffic through a gateway and two worker processes, read with the
Prometheus project's own OpenMetrics parser: the request counters and histogram counts
equal what was sent."""
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import Gateway, Worker

OK, BAD, STREAMED = 30, 3, 10


def scrape(server):
    port = server.metrics_url.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    # The parser is strict: any malformed line, type or missing "# EOF" raises.
    return {f.name: f for f in text_string_to_metric_families(text)}


def total(families, family, sample, **labels):
    # A family with no series yet is not in the text at all: 0.
    return sum(s.value for s in getattr(families.get(family), "samples", [])
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def traffic():
    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    good = grpcclient.InferInput("input", [1, 64], "FP32")
    good.set_data_from_numpy(np.zeros((1, 64), np.float32))
    bad = grpcclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
    for _ in range(OK):
        gateway.client.infer("digits", [good])
    for _ in range(BAD):
        with pytest.raises(grpcclient.InferenceServerException):
            gateway.client.infer("digits", [bad])
    answers = []
    c = grpcclient.InferenceServerClient(gateway.url)
    c.start_stream(callback=lambda result, error: answers.append(error))
    for n in range(STREAMED):
        c.async_stream_infer("digits", [good], request_id=str(n))
    c.stop_stream()  # waits for every answer
    c.close()
    assert answers == [None] * STREAMED
    yield gateway, workers
    assert gateway.stop() == 0
    for w in workers:
        assert w.stop() == 0


def test_gateway_counts_equal_requests_sent(traffic):
    gateway, _ = traffic
    m = scrape(gateway)
    assert total(m, "infermesh_gateway_requests", "infermesh_gateway_requests_total",
                 model="digits", code="Ok") == OK + STREAMED
    assert total(m, "infermesh_gateway_requests", "infermesh_gateway_requests_total",
                 model="digits", code="InvalidArgument") == BAD
    assert total(m, "infermesh_gateway_request_duration_seconds",
                 "infermesh_gateway_request_duration_seconds_count", model="digits") == OK + STREAMED + BAD
    assert total(m, "infermesh_gateway_open_streams", "infermesh_gateway_open_streams") == 0
    assert total(m, "process_resident_memory_bytes", "process_resident_memory_bytes") > 0


def test_worker_counts_add_up_to_requests_sent(traffic):
    _, workers = traffic
    ms = [scrape(w) for w in workers]

    def both(family, sample, **labels):
        return sum(total(m, family, sample, **labels) for m in ms)

    assert both("infermesh_requests", "infermesh_requests_total", model="digits", code="Ok") == OK + STREAMED
    assert both("infermesh_requests", "infermesh_requests_total", model="digits", code="InvalidArgument") == BAD
    assert both("infermesh_request_duration_seconds", "infermesh_request_duration_seconds_count",
                model="digits") == OK + STREAMED + BAD
    # Only valid requests are queued and run; every one is a row of some executed batch.
    assert both("infermesh_queue_duration_seconds", "infermesh_queue_duration_seconds_count",
                model="digits") == OK + STREAMED
    assert both("infermesh_batch_size", "infermesh_batch_size_sum", model="digits") == OK + STREAMED
    assert both("infermesh_inflight_requests", "infermesh_inflight_requests") == 0
    # Both workers served some of them (the gateway balances).
    assert all(total(m, "infermesh_requests", "infermesh_requests_total", model="digits") > 0 for m in ms)
