"""The routing file (--routes) through a real gateway in front of real workers (the identity
backend): a weighted split over versions, unary and on one stream; named versions never
split; a version no worker has fails its share (version-unavailable) or, with fallback,
shares it; metadata follows the heaviest version; a bad file stops the gateway at start and
a bad reload keeps the last good policy; hedging moves requests off a slow worker and
cancels its queued copies. Also `infermesh routes`."""
import json
import queue
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import Gateway, Server, Worker, binary, wait_for
from test_metrics import scrape, total

IDENTITY = ('backend: "identity"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')


def repo(root, versions=(1, 2), extra=""):
    (root / "canary").mkdir(parents=True, exist_ok=True)
    for v in versions:
        (root / "canary" / str(v)).mkdir(exist_ok=True)
    (root / "canary" / "config.pbtxt").write_text(IDENTITY + "version_policy: { all: { } }\n" + extra)
    return root


def x():
    i = grpcclient.InferInput("INPUT0", [4], "FP32")
    i.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return i


def version_of(client, model="canary", version=""):
    return client.infer(model, [x()], model_version=version).get_response().model_version


def routes_json(gateway):
    out = subprocess.run([binary("infermesh"), "routes", "--url", gateway.url, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    root = repo(tmp_path_factory.mktemp("repo"))
    workers = [Worker("--model-repository", str(root)) for _ in range(2)]
    routes = tmp_path_factory.mktemp("routes") / "routes.yaml"
    routes.write_text('models:\n  canary:\n    split: {"1": 9, "2": 1}\n')
    gateway = Gateway(*workers, extra=("--routes", str(routes)))
    yield gateway, routes
    gateway.stop()
    for w in workers:
        w.stop()


def test_a_9_to_1_split_lands_exactly_unary_and_on_one_stream(two_versions):
    gateway, _ = two_versions
    c = gateway.client
    got = Counter(version_of(c) for _ in range(2000))
    assert got == {"1": 1800, "2": 200}, got
    # Named versions are never split.
    assert {version_of(c, version="2") for _ in range(50)} == {"2"}
    assert {version_of(c, version="1") for _ in range(50)} == {"1"}
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for n in range(2000):
            c.async_stream_infer("canary", [x()], request_id=str(n))
        results = [answers.get(timeout=60) for _ in range(2000)]
    finally:
        c.stop_stream()
    assert all(e is None for _, e in results), [e for _, e in results if e][:3]
    got = Counter(r.get_response().model_version for r, _ in results)
    assert got == {"1": 1800, "2": 200}, got
    view = routes_json(gateway)["models"][0]
    assert [(v["version"], v["weight"], v["weight_in_force"]) for v in view["split"]] == [(1, 9, 9), (2, 1, 1)]
    assert sum(v["routed"] for v in view["split"]) >= 4000


def test_metadata_follows_the_heaviest_version(two_versions):
    gateway, routes = two_versions
    assert gateway.client.get_model_metadata("canary").versions == ["1"]
    assert gateway.client.get_model_config("canary").config.name == "canary"


def test_a_bad_reload_keeps_the_policy_and_a_good_one_takes_effect(two_versions):
    gateway, routes = two_versions
    before = routes_json(gateway)["reloads"]
    routes.write_text('models:\n  canary:\n    split: {"1": 9, "2": "lots"}\n')
    wait_for("the bad reload", lambda: total(scrape(gateway), "infermesh_config_reloads", "infermesh_config_reloads_total",
                                             file="routes", result="error") >= 1)
    assert routes_json(gateway)["reloads"] == before
    assert Counter(version_of(gateway.client) for _ in range(100)) == {"1": 90, "2": 10}
    routes.write_text('models:\n  canary:\n    split: {"2": 1}\n')
    wait_for("the good reload", lambda: routes_json(gateway)["reloads"] == before + 1)
    assert {version_of(gateway.client) for _ in range(50)} == {"2"}
    assert gateway.client.get_model_metadata("canary").versions == ["2"]
    routes.write_text('models:\n  canary:\n    split: {"1": 9, "2": 1}\n')
    wait_for("the split back", lambda: routes_json(gateway)["reloads"] == before + 2)


def test_a_version_no_worker_has_fails_its_share_unless_fallback(tmp_path):
    root = repo(tmp_path / "repo", versions=(1,))
    w = Worker("--model-repository", str(root))
    routes = tmp_path / "routes.yaml"
    routes.write_text('models:\n  canary:\n    split: {"1": 1, "2": 1}\n')
    g = Gateway(w, extra=("--routes", str(routes)))
    try:
        ok, failed = 0, []
        for _ in range(100):
            try:
                assert version_of(g.client) == "1"
                ok += 1
            except InferenceServerException as e:
                failed.append(e)
        assert ok == 50 and len(failed) == 50, (ok, failed[:1])
        e = failed[0]
        assert e.status() == "StatusCode.UNAVAILABLE", e.status()
        assert "version 2" in e.message() and "fallback" in e.message(), e.message()
        assert total(scrape(g), "infermesh_gateway_split_requests", "infermesh_gateway_split_requests_total",
                     model="canary", version="2", result="unavailable") == 50
        view = routes_json(g)["models"][0]["split"][1]
        assert "version-unavailable" in view["skipped"] and view["unavailable"] == 50, view
        routes.write_text('models:\n  canary:\n    split: {"1": 1, "2": 1}\n    fallback: true\n')
        wait_for("the fallback reload", lambda: routes_json(g)["models"][0]["fallback"])
        assert {version_of(g.client) for _ in range(100)} == {"1"}
        view = routes_json(g)["models"][0]["split"][1]
        assert view["weight_in_force"] == 0 and "fallback" in view["skipped"], view
    finally:
        g.stop()
        w.stop()


def test_a_bad_routing_file_stops_the_gateway_at_start_naming_the_line(tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text('models:\n  canary:\n    split: {"1": 9}\n    hedge: {after: p97}\n')
    out = subprocess.run([binary("infermesh-gateway"), "--workers", "127.0.0.1:1", "--routes", str(routes),
                          "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "routes.yaml" in out.stderr and "line 4" in out.stderr and "p97" in out.stderr, out.stderr


def run_load(url, n, concurrency=8):
    """n requests from `concurrency` threads; each request's seconds."""
    times, lock = [], threading.Lock()

    def one():
        c = grpcclient.InferenceServerClient(url)
        for _ in range(n // concurrency):
            start = time.monotonic()
            c.infer("canary", [x()])
            with lock:
                times.append(time.monotonic() - start)
        c.close()

    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


@pytest.mark.parametrize("hedged", [False, True])
def test_hedging_moves_requests_off_a_slow_worker_and_cancels_its_queue(tmp_path, hedged):
    """One of three workers takes 500 ms per request. Unhedged, the requests the balancer
    sends it before it has measured it wait for it; hedged after 20 ms, a copy on a fast
    worker answers each of them and the slow worker's queued copies are cancelled before
    they run."""
    fast = repo(tmp_path / "fast", versions=(1,))
    slow = repo(tmp_path / "slow", versions=(1,), extra='parameters { key: "delay_ms" value: { string_value: "500" } }\n')
    workers = [Worker("--model-repository", str(fast)), Worker("--model-repository", str(fast)),
               Worker("--model-repository", str(slow))]
    routes = tmp_path / "routes.yaml"
    routes.write_text("models:\n  canary:\n    hedge: {after_ms: 20}\n" if hedged else "models: {}\n")
    g = Gateway(*workers, extra=("--routes", str(routes)))
    try:
        times = run_load(g.url, 400)
        waited = sum(t >= 0.4 for t in times)
        m = scrape(g)
        won = total(m, "infermesh_gateway_hedges", "infermesh_gateway_hedges_total", model="canary", result="won")

        def cancelled():
            return total(scrape(workers[2]), "infermesh_skipped_requests",
                         "infermesh_skipped_requests_total", code="CANCELLED")
        if hedged:
            assert waited == 0, f"{waited} requests waited for the slow worker"
            assert won >= 1
            # Skipped when its instance reaches them, after the copy running there.
            wait_for("the slow worker's queued copies skipped, never run", lambda: cancelled() >= 1)
            view = routes_json(g)["models"][0]["hedging"]
            assert view["hedged"] >= won and view["requests"] == 400, view
        else:
            assert waited >= 1, "the balancer tries the slow worker before it has measured it"
            assert won == 0
    finally:
        g.stop()
        for w in workers:
            w.stop()
