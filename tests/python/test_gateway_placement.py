"""The gateway places models on workers in --model-control-mode placement: a request for
a model no worker holds has it loaded on the model's first-ranked worker (rendezvous
ranking, the same in every gateway), waiting meanwhile; concurrent first requests make
one load, also from two gateways; a worker without room passes the load to the next in
the ranking; a killed holder's model is loaded elsewhere; a 40-model catalog on workers
that each hold a fraction of it is served whole under Zipf traffic."""
import concurrent.futures
import signal
import subprocess
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import Gateway, Worker, binary, wait_for
from test_placement import matmul_model, metric

MiB = 1 << 20
CATALOG = 40


def weights(k):
    return np.random.RandomState(k).rand(k, k).astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """40 models in three sizes (256 KiB, 1 MiB and 2.25 MiB of weights); model i
    multiplies by the matrix seeded by its size k."""
    root = tmp_path_factory.mktemp("catalog")
    for i in range(CATALOG):
        matmul_model(root / f"m{i}" / "1" / "model.onnx", size(i))
    matmul_model(root / "huge" / "1" / "model.onnx", 2896)
    return root


def size(i):
    return (256, 512, 768)[i % 3]


def score(model, worker):
    """The gateway's rendezvous score (FNV-1a, SplitMix64 finish)."""
    m = (1 << 64) - 1
    h = 0xcbf29ce484222325
    for b in model.encode() + b"\0" + worker.encode():
        h = ((h ^ b) * 0x100000001b3) & m
    h ^= h >> 30
    h = (h * 0xbf58476d1ce4e5b9) & m
    h ^= h >> 27
    h = (h * 0x94d049bb133111eb) & m
    return h ^ (h >> 31)


def ranked(model, workers):
    return sorted(workers, key=lambda w: (-score(model, w.url), w.url))


def placed(repo, capacity, *extra):
    return Worker("--model-repository", str(repo), "--model-control-mode", "placement",
                  "--model-memory-bytes", str(capacity), "--model-min-idle", "0s", "--intra-op-threads", "1", *extra)


def ask(client, name, timeout=60):
    k = size(int(name[1:]))
    x = np.arange(k, dtype=np.float32)[None, :] / k
    i = grpcclient.InferInput("x", [1, k], "FP32")
    i.set_data_from_numpy(x)
    y = client.infer(name, [i], client_timeout=timeout).as_numpy("y")
    np.testing.assert_allclose(y, x @ weights(k), rtol=1e-4)


def loads(workers):
    return sum(metric(w, "infermesh_model_loads_total") for w in workers)


def holders(workers, name):
    return [w for w in workers if any(m.name == name and m.state == "READY"
                                      for m in w.client.get_model_repository_index().models)]


def test_a_hundred_first_requests_make_one_load_from_one_gateway_or_two(repo):
    workers = [placed(repo, 64 * MiB) for _ in range(3)]
    gateways = [Gateway(*workers), Gateway(*workers)]
    try:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            list(pool.map(lambda _: ask(gateways[0].client, "m1"), range(100)))
        assert loads(workers) == 1
        assert holders(workers, "m1") == [ranked("m1", workers)[0]], "loaded on its first-ranked worker"
        assert metric(gateways[0], "infermesh_gateway_placement_loads_total", result="loaded") == 1
        assert metric(gateways[0], "infermesh_gateway_placement_requests_total", result="cold") >= 1
        # Two gateways rank alike: they ask the same worker, which loads once.
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            list(pool.map(lambda i: ask(gateways[i % 2].client, "m2"), range(100)))
        assert loads(workers) == 2
        assert holders(workers, "m2") == [ranked("m2", workers)[0]]
        assert metric(gateways[0], "infermesh_gateway_placement_requests_total", result="hit") >= 1
    finally:
        for s in [*gateways, *workers]:
            assert s.stop() == 0


def test_a_load_refused_for_capacity_goes_to_the_next_ranked_worker(repo):
    # The small worker's capacity is below the 1 MiB of weights of a k=512 model.
    small, large = placed(repo, 512 * 1024), placed(repo, 24 * MiB)
    gateway = Gateway(small, large)
    try:
        # A model whose ranking puts the small worker first.
        name = next(f"m{i}" for i in range(CATALOG) if ranked(f"m{i}", [small, large])[0] is small and size(i) == 512)
        ask(gateway.client, name)
        assert holders([small, large], name) == [large]
        assert metric(gateway, "infermesh_gateway_placement_load_refusals_total", reason="over-capacity") == 1
        assert metric(small, "infermesh_model_load_refusals_total", reason="over-capacity") == 1
        # Too large for every worker: refused with the reason, naming each worker's answer.
        with pytest.raises(InferenceServerException) as e:
            x = grpcclient.InferInput("x", [1, 2896], "FP32")
            x.set_data_from_numpy(np.ones((1, 2896), np.float32))
            gateway.client.infer("huge", [x], client_timeout=60)
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value
        assert "over-capacity" in str(e.value) and small.url in str(e.value) and large.url in str(e.value), e.value
        ask(gateway.client, name)  # the gateway serves on
    finally:
        for s in (gateway, small, large):
            assert s.stop() == 0


def test_a_killed_holders_model_is_loaded_elsewhere_and_metadata_loads_too(repo):
    workers = [placed(repo, 64 * MiB) for _ in range(2)]
    gateway = Gateway(*workers)
    try:
        meta = gateway.client.get_model_metadata("m4")  # loads it, as a first request would
        assert meta.inputs[0].shape == [-1, size(4)]
        assert gateway.client.is_model_ready("m5"), "a model that can be loaded is ready to serve"
        first = ranked("m4", workers)[0]
        assert holders(workers, "m4") == [first]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
        for _ in range(5):
            ask(gateway.client, "m4")
        other = next(w for w in workers if w is not first)
        assert holders([other], "m4") == [other]
    finally:
        gateway.stop()
        for w in workers:
            if w.proc.poll() is None:
                assert w.stop() == 0


def test_the_churn_guard_waits_within_the_deadline(repo):
    # Room for one model (after the first load's own start) and no eviction of a model used
    # within a minute.
    w = Worker("--model-repository", str(repo), "--model-control-mode", "placement",
               "--model-memory-bytes", str(24 * MiB), "--model-min-idle", "60s", "--intra-op-threads", "1")
    gateway = Gateway(w)
    try:
        ask(gateway.client, "m0")
        n = 1
        while True:
            try:
                ask(gateway.client, f"m{n}", timeout=2)
            except InferenceServerException as e:
                # Not at once: it waited and asked again until its deadline was near.
                assert e.status() == "StatusCode.RESOURCE_EXHAUSTED", e
                assert "churn-guard" in str(e) and "before the deadline" in str(e), e
                break
            n += 1
            assert n < CATALOG, "the capacity never filled"
        # Asked more than once while it waited (every 250 ms), never failed at once.
        assert metric(w, "infermesh_model_load_refusals_total", reason="churn-guard") >= 2
    finally:
        for s in (gateway, w):
            assert s.stop() == 0


def test_a_catalog_larger_than_the_fleet_is_served_whole_under_zipf_traffic(repo):
    # The first load in a worker takes about 10 MiB (ONNX Runtime's own start with it),
    # each later one at least its weights: each holds a handful of the 40 models.
    capacity = 16 * MiB
    workers = [placed(repo, capacity) for _ in range(3)]
    gateway = Gateway(*workers)
    try:
        rng = np.random.RandomState(7)
        p = 1.0 / np.arange(1, CATALOG + 1)
        names = [f"m{i}" for i in rng.choice(CATALOG, size=400, p=p / p.sum())]
        names += [f"m{i}" for i in range(CATALOG)]  # every model at least once
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: ask(gateway.client, n), names))
        assert metric(gateway, "infermesh_gateway_placement_requests_total", result="hit") > 0
        held = [sum(m.state == "READY" for m in w.client.get_model_repository_index().models) for w in workers]
        assert max(held) < CATALOG / 2 and sum(held) < CATALOG, held  # the fleet holds a fraction at a time
        assert sum(metric(w, "infermesh_model_evictions_total") for w in workers) > 0
        for w in workers:
            assert metric(w, "infermesh_model_memory_used_bytes") <= capacity
    finally:
        for s in [gateway, *workers]:
            assert s.stop() == 0


def test_min_copies_are_loaded_ahead_of_traffic_and_never_evicted(repo, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text("models:\n  m7:\n    copies: {min: 2}\n")
    workers = [placed(repo, 16 * MiB) for _ in range(3)]
    gateway = Gateway(*workers, extra=("--routes", str(routes)))
    try:
        want = ranked("m7", workers)[:2]
        wait_for("two copies of m7", lambda: sorted(w.url for w in holders(workers, "m7")) == sorted(w.url for w in want))
        assert metric(gateway, "infermesh_gateway_placement_copies_added_total", result="min") >= 2
        # `infermesh models` shows where each model's copies are, their size and last use.
        out = subprocess.run([binary("infermesh"), "models", "--url", gateway.url], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip()}
        assert "copies 2:" in rows["m7"] and "pinned" in rows["m7"] and want[0].url in rows["m7"], out.stdout
        assert "not loaded: loads on request" in rows["m8"], out.stdout
        assert "MiB used" in out.stdout.split("WORKER STATE")[1], out.stdout
        # Pinned: an unload straight at the worker is refused.
        for w in want:
            with pytest.raises(InferenceServerException) as e:
                w.client.unload_model("m7")
            assert "pinned" in str(e.value), e.value
        # Every model of the catalog through the gateway: far more than the workers hold.
        for i in range(CATALOG):
            ask(gateway.client, f"m{i}")
        assert sum(metric(w, "infermesh_model_evictions_total") for w in workers) > 0
        assert {w.url for w in want} <= {w.url for w in holders(workers, "m7")}
    finally:
        for s in [gateway, *workers]:
            assert s.stop() == 0


def test_copies_follow_load_up_to_the_routing_files_max(repo, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text("models:\n  m2:\n    copies: {max: 2}\n")
    workers = [placed(repo, 64 * MiB) for _ in range(3)]
    gateway = Gateway(*workers, extra=("--routes", str(routes), "--placement-copy-inflight", "2",
                                       "--placement-copy-window", "1s"))
    stop = threading.Event()

    def hammer():
        x = grpcclient.InferInput("x", [8, 768], "FP32")
        x.set_data_from_numpy(np.ones((8, 768), np.float32))
        c = grpcclient.InferenceServerClient(gateway.url)
        while not stop.is_set():
            c.infer("m2", [x], client_timeout=60)

    try:
        ask(gateway.client, "m2")
        first, second = ranked("m2", workers)[:2]
        assert holders(workers, "m2") == [first]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            running = [pool.submit(hammer) for _ in range(12)]
            try:
                wait_for("a second copy", lambda: len(holders(workers, "m2")) == 2)
                assert {w.url for w in holders(workers, "m2")} == {first.url, second.url}
                # Still saturated, and at the routing file's max: no third copy.
                added = metric(gateway, "infermesh_gateway_placement_copies_added_total", result="load")
                served = lambda: sum(metric(w, "infermesh_requests_total", model="m2") for w in workers)  # noqa: E731
                then = served()
                wait_for("1,000 more requests", lambda: served() > then + 1000, timeout=120)
                assert len(holders(workers, "m2")) == 2
                assert metric(gateway, "infermesh_gateway_placement_copies_added_total", result="load") == added
            finally:
                stop.set()
                for r in running:
                    r.result()
    finally:
        for s in [gateway, *workers]:
            assert s.stop() == 0


def test_a_draining_worker_keeps_its_models_until_they_are_loaded_elsewhere(repo):
    workers = [placed(repo, 64 * MiB, "--shutdown-grace", "5s") for _ in range(2)]
    gateway = Gateway(*workers)
    stop, failures, served = threading.Event(), [], [0]

    def traffic():
        c = grpcclient.InferenceServerClient(gateway.url)
        while not stop.is_set():
            try:
                ask(c, "m10")
                served[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                failures.append(e)

    try:
        ask(gateway.client, "m10")
        first = ranked("m10", workers)[0]
        other = next(w for w in workers if w is not first)
        cold = metric(gateway, "infermesh_gateway_placement_requests_total", result="cold")
        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            first.proc.send_signal(signal.SIGTERM)
            wait_for("m10 loaded on the other worker", lambda: holders([other], "m10") == [other])
            wait_for("the draining worker out of rotation", lambda: metric(
                gateway, "infermesh_gateway_worker_ready", worker=first.url) == 0)
            then = served[0]
            wait_for("requests after the move", lambda: served[0] > then + 20)
        finally:
            stop.set()
            thread.join(timeout=60)
        assert not failures, failures[:3]
        # Served by the draining worker until the copy was ready: no request waited for a load.
        assert metric(gateway, "infermesh_gateway_placement_requests_total", result="cold") == cold
        assert first.proc.wait(timeout=60) == 0
    finally:
        gateway.stop()
        for w in workers:
            if w.proc.poll() is None:
                assert w.stop() == 0


def test_stream_messages_wait_for_their_models_load(repo):
    """Messages of one ModelStreamInfer stream for models no worker holds each wait for
    their model's load; every message is answered, in any order."""
    import queue
    workers = [placed(repo, 64 * MiB) for _ in range(2)]
    gateway = Gateway(*workers)
    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(gateway.url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        names = [f"m{i}" for i in (20, 21, 22, 20, 21, 22)]
        for n, name in enumerate(names):
            k = size(int(name[1:]))
            x = grpcclient.InferInput("x", [1, k], "FP32")
            x.set_data_from_numpy(np.full((1, k), n, np.float32))
            client.async_stream_infer(name, [x], request_id=str(n))
        got = {}
        for _ in names:
            result, error = answers.get(timeout=60)
            assert error is None, error
            got[result.get_response().id] = result.as_numpy("y")
        for n, name in enumerate(names):
            k = size(int(name[1:]))
            np.testing.assert_allclose(got[str(n)], np.full((1, k), n, np.float32) @ weights(k), rtol=1e-4)
        assert loads(workers) == 3
    finally:
        client.stop_stream()
        client.close()
        for s in [gateway, *workers]:
            assert s.stop() == 0


def test_a_version_the_model_does_not_have_is_not_found_without_loads_elsewhere(repo):
    workers = [placed(repo, 64 * MiB) for _ in range(2)]
    gateway = Gateway(*workers)
    try:
        k = size(11)
        x = grpcclient.InferInput("x", [1, k], "FP32")
        x.set_data_from_numpy(np.ones((1, k), np.float32))
        for _ in range(3):
            with pytest.raises(InferenceServerException) as e:
                gateway.client.infer("m11", [x], model_version="99", client_timeout=60)
            assert e.value.status() == "StatusCode.NOT_FOUND", e.value
            assert "version 99" in str(e.value), e.value
        assert loads(workers) == 1, "one load of the model, then its versions are known"
        assert metric(gateway, "infermesh_gateway_placement_loads_total", result="failed") == 0
    finally:
        for s in [gateway, *workers]:
            assert s.stop() == 0
