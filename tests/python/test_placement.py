"""A worker in --model-control-mode placement with real ONNX models of several sizes made
here: loads within --model-memory-bytes (by the worker's measurement and by /proc), least
recently used idle models evicted first, pinned models never, the churn guard's refusal,
100 concurrent loads making one, a model too large refused while the worker serves on,
statistics that keep counting across an eviction, and measured sizes near the resident
set's growth."""
import concurrent.futures
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ROOT, Worker

sys.path.append(str(ROOT / "bench"))
from placement import matmul_model  # noqa: E402 - the benchmark's generator: y = x · W, W a constant k×k
from placement import metric as scrape  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    for name, k in [("a", 1024), ("b", 1024), ("c", 1024), ("d", 1024), ("pinned", 1024), ("huge", 2896)]:
        matmul_model(root / name / "1" / "model.onnx", k)
    return root


def metric(server, name, **labels):
    """A series of `server`'s metrics, summed over the labels not given."""
    return scrape(server.metrics_url, name, **labels)


def rss(server):
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def states(server):
    return {m.name: m.state for m in server.client.get_model_repository_index().models}


def infer(server, name, k=1024):
    x = grpcclient.InferInput("x", [1, k], "FP32")
    x.set_data_from_numpy(np.ones((1, k), np.float32))
    return server.client.infer(name, [x]).as_numpy("y")


def placed(repo, *extra):
    return Worker("--model-repository", str(repo), "--model-control-mode", "placement", *extra)


def sizes(repo):
    """What the first load in a worker takes (ONNX Runtime's one-time setup with it) and
    what a later load of a 4 MiB model takes, as the worker measures them."""
    w = placed(repo, "--model-memory-bytes", str(1 << 30))
    try:
        w.client.load_model("a")
        w.client.load_model("b")
        return metric(w, "infermesh_model_memory_bytes", model="a"), metric(w, "infermesh_model_memory_bytes", model="b")
    finally:
        assert w.stop() == 0


def test_loads_stay_within_capacity_least_recently_used_first(repo):
    first, size = sizes(repo)
    assert size > 4 * MiB and first >= size, (first, size)
    capacity = int(first + 1.6 * size)  # the first model and one and a half more
    w = placed(repo, "--model-memory-bytes", str(capacity), "--model-min-idle", "0s")
    try:
        baseline = rss(w)
        assert set(states(w).values()) == {"UNAVAILABLE"}, "nothing loads at start"
        w.client.load_model("a")
        w.client.load_model("b")
        infer(w, "a")  # b is now the least recently used
        w.client.load_model("c")
        s = states(w)
        assert (s["a"], s["b"], s["c"]) == ("READY", "UNAVAILABLE", "READY"), s
        w.client.load_model("d")
        s = states(w)
        assert (s["a"], s["c"], s["d"]) == ("UNAVAILABLE", "READY", "READY"), s
        assert metric(w, "infermesh_model_evictions_total") == 2
        assert metric(w, "infermesh_model_memory_used_bytes") <= capacity
        # /proc agrees, within what one model takes (freed memory goes back lazily).
        assert rss(w) - baseline <= capacity + size, (rss(w) - baseline, capacity)
        assert infer(w, "d").shape == (1, 1024)
    finally:
        assert w.stop() == 0


def test_pinned_models_stay_and_the_churn_guard_refuses_with_its_reason(repo):
    first, size = sizes(repo)
    w = placed(repo, "--model-memory-bytes", str(int(first + 1.5 * size)), "--model-min-idle", "60s",
               "--load-model", "pinned")
    try:
        assert states(w)["pinned"] == "READY"
        w.client.load_model("a")
        with pytest.raises(InferenceServerException) as e:
            w.client.load_model("b")
        assert "churn-guard" in str(e.value) and "--model-min-idle" in str(e.value), e.value
        assert metric(w, "infermesh_model_load_refusals_total", reason="churn-guard") == 1
        with pytest.raises(InferenceServerException) as e:
            w.client.unload_model("pinned")
        assert "pinned" in str(e.value)
        assert states(w)["pinned"] == "READY" and states(w)["a"] == "READY"
    finally:
        assert w.stop() == 0


def test_a_model_too_large_is_refused_and_the_worker_serves_on(repo):
    first, size = sizes(repo)
    w = placed(repo, "--model-memory-bytes", str(int(first + 1.5 * size)), "--model-min-idle", "0s")
    try:
        w.client.load_model("a")
        with pytest.raises(InferenceServerException) as e:
            w.client.load_model("huge")  # 32 MiB of weights
        assert "over-capacity" in str(e.value) and "whole capacity" in str(e.value), e.value
        assert states(w)["a"] == "READY", "nothing was evicted for a load that cannot fit"
        assert infer(w, "a").shape == (1, 1024)
    finally:
        assert w.stop() == 0


def test_a_hundred_concurrent_loads_make_one(repo):
    w = placed(repo, "--model-memory-bytes", str(1 << 30))
    try:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            clients = [grpcclient.InferenceServerClient(w.url) for _ in range(100)]
            list(pool.map(lambda c: c.load_model("b"), clients))
        assert metric(w, "infermesh_model_loads_total", result="ok") == 1
        assert states(w)["b"] == "READY"
    finally:
        assert w.stop() == 0


def test_statistics_keep_counting_across_an_eviction(repo):
    first, size = sizes(repo)
    w = placed(repo, "--model-memory-bytes", str(int(first + 0.5 * size)), "--model-min-idle", "0s")
    try:
        def successes():
            s = w.client.get_inference_statistics("c", as_json=True)["model_stats"]
            return int(s[0]["inference_stats"]["success"].get("count", 0)) if s else None

        w.client.load_model("c")
        infer(w, "c")
        infer(w, "c")
        assert successes() == 2
        w.client.load_model("d")  # room for one: c goes
        assert states(w)["c"] == "UNAVAILABLE"
        w.client.load_model("c")
        infer(w, "c")
        assert successes() == 3
    finally:
        assert w.stop() == 0


def test_measured_sizes_are_near_the_resident_sets_growth(repo):
    w = placed(repo, "--model-memory-bytes", str(1 << 30))
    try:
        for name in ("a", "huge"):
            before = rss(w)
            w.client.load_model(name)
            grown = rss(w) - before
            measured = metric(w, "infermesh_model_memory_bytes", model=name)
            # Within 2 MiB or 10 %: the same growth, seen from inside and from /proc.
            assert abs(measured - grown) <= max(2 * MiB, 0.1 * grown), (name, measured, grown)
    finally:
        assert w.stop() == 0


def test_placement_flags_are_refused_in_other_modes(repo):
    import subprocess

    from conftest import binary
    out = subprocess.run([binary("infermesh-worker"), "--model-repository", str(repo), "--grpc-port", "0",
                          "--model-memory-bytes", "1000000"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--model-memory-bytes applies only with --model-control-mode placement" in out.stderr


def test_the_change_stream_gives_a_snapshot_then_each_change_in_order(repo):
    """infermesh.placement.v1.Placement/Watch through grpcurl (reflection): a snapshot of
    every model with the worker's memory, then b loading and ready, its use within about
    a second of its requests, and its unload — each change once, sequences growing."""
    import json
    import queue
    import shutil
    import subprocess
    import threading

    w = placed(repo, "--model-memory-bytes", str(1 << 30), "--load-model", "a")
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl is installed by scripts/pyenv.sh"
    proc = subprocess.Popen([exe, "-plaintext", "-d", "{}", w.url, "infermesh.placement.v1.Placement/Watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    messages = queue.Queue()

    def read():
        decoder, buf = json.JSONDecoder(), ""
        for line in proc.stdout:
            buf += line
            try:
                msg, end = decoder.raw_decode(buf.strip())
            except json.JSONDecodeError:
                continue
            messages.put(msg)
            buf = buf.strip()[end:]

    threading.Thread(target=read, daemon=True).start()

    def until(pred, what):
        while True:
            try:
                m = messages.get(timeout=30)
            except queue.Empty:
                raise AssertionError(f"no message with {what}")
            got.append(m)
            if pred(m):
                return m

    def version(m, name):
        return [v for v in m.get("models", []) if v["name"] == name]

    got = []
    try:
        first = until(lambda m: True, "a snapshot")
        assert first.get("snapshot") is True, first
        models = {v["name"]: v for v in first["models"]}
        assert models["a"]["state"] == "READY" and models["a"].get("pinned") is True, models["a"]
        assert models["a"].get("memoryMeasured") is True and int(models["a"]["memoryBytes"]) > MiB
        assert models["b"]["state"] == "UNAVAILABLE" and models["b"]["reason"] == "unloaded"
        assert int(first["memory"]["capacityBytes"]) == 1 << 30
        assert int(first["memory"]["usedBytes"]) == int(models["a"]["memoryBytes"])

        w.client.load_model("b")
        until(lambda m: any(v["state"] == "LOADING" for v in version(m, "b")), "b loading")
        ready = until(lambda m: any(v["state"] == "READY" for v in version(m, "b")), "b ready")
        assert int(version(ready, "b")[0]["memoryBytes"]) > MiB
        for _ in range(5):
            infer(w, "b")
        used = until(lambda m: any(v.get("requestsPerSecond", 0) > 0 for v in version(m, "b")), "b's use")
        assert int(version(used, "b")[0]["lastUseUnixMs"]) > 0
        w.client.unload_model("b")
        until(lambda m: any(v["state"] == "UNAVAILABLE" for v in version(m, "b")), "b unloaded")
        sequences = [int(m.get("sequence", 0)) for m in got[1:]]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences), sequences
        assert not any(m.get("snapshot") for m in got[1:]), "a follower keeping up gets no second snapshot"
    finally:
        proc.kill()
        proc.wait()
        assert w.stop() == 0


def test_a_follower_that_stops_reading_gets_a_fresh_snapshot(repo):
    """A raw HTTP/2 follower that grants 1 KiB of window and stops reading while a model
    loads and unloads 60 times (180 changes): the worker keeps at most its backlog for it,
    and when the follower reads again it gets a second snapshot in place of what it
    missed. (A snapshot is a WatchResponse with field 1 set: it starts 08 01.)"""
    import h2.events
    import h2.settings

    from test_connections import connect, read_until

    w = placed(repo, "--model-memory-bytes", str(1 << 30))
    try:
        s, c = connect(w.url)
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
        c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                           (":path", "/infermesh.placement.v1.Placement/Watch"),
                           ("content-type", "application/grpc"), ("te", "trailers")])
        c.send_data(1, b"\0\0\0\0\0", end_stream=True)
        s.sendall(c.data_to_send())
        data = bytearray()

        def take(events):
            for e in events:
                if isinstance(e, h2.events.DataReceived) and e.stream_id == 1:
                    data.extend(e.data)
                    c.acknowledge_received_data(e.flow_controlled_length, 1)

        def messages():
            out, at = [], 0
            while at + 5 <= len(data):
                n = int.from_bytes(data[at + 1:at + 5], "big")
                if at + 5 + n > len(data):
                    break
                out.append(bytes(data[at + 5:at + 5 + n]))
                at += 5 + n
            return out

        # The first snapshot, then stop reading (no window updates go out).
        events = read_until(s, c, lambda ev: any(isinstance(e, h2.events.DataReceived) for e in ev))
        data.extend(b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)))
        for _ in range(60):
            w.client.load_model("c")
            w.client.unload_model("c")
        # Read again: window updates go out as data comes in (for the first snapshot too).
        c.acknowledge_received_data(len(data), 1)
        s.sendall(c.data_to_send())
        taken = [0]

        def second_snapshot(ev):
            take(ev[taken[0]:])
            taken[0] = len(ev)
            s.sendall(c.data_to_send())
            return sum(m.startswith(b"\x08\x01") for m in messages()) >= 2

        read_until(s, c, second_snapshot, timeout=30)
        got = messages()
        assert got[0].startswith(b"\x08\x01"), got[0][:8]
        assert len(got) < 180, "it was not handed every change"
        s.close()
        assert w.client.is_server_ready()
    finally:
        assert w.stop() == 0
