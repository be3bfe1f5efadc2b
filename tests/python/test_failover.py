"""Workers dying or restarting under load behind the gateway: clients see no failure.
Real processes on loopback; SIGKILL and SIGTERM sent by PID to workers this test started."""
import json
import signal
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient

from conftest import MODELS, Gateway, Worker


def load(url, total, concurrency, on_progress):
    """`total` digits requests over `concurrency` threads; returns the failures."""
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    failures, done, lock = [], [0], threading.Lock()

    def run(n):
        c = grpcclient.InferenceServerClient(url)
        for _ in range(n):
            i = grpcclient.InferInput("input", [1, 64], "FP32")
            i.set_data_from_numpy(x)
            try:
                c.infer("digits", [i])
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(str(e))
            with lock:
                done[0] += 1
                on_progress(done[0])

    threads = [threading.Thread(target=run, args=(total // concurrency,)) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return failures


def test_sigkill_of_one_worker_under_load_loses_nothing():
    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    killed = []

    def kill_at(n):
        if n == 500 and not killed:
            workers[0].proc.send_signal(signal.SIGKILL)
            killed.append(time.monotonic())

    try:
        failures = load(gateway.url, 2000, 8, kill_at)
        assert killed, "the worker was killed mid-run"
        assert failures == [], f"{len(failures)} failed, first: {failures[:3]}"
    finally:
        assert gateway.stop() == 0
        workers[0].proc.wait(timeout=10)
        assert workers[1].stop() == 0


def test_sigterm_of_one_worker_under_load_loses_nothing():
    """A rolling restart: SIGTERM drains the worker (NOT_SERVING, then refusals, then exit)."""
    workers = [Worker("--intra-op-threads", "1", "--shutdown-grace", "1s"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    stopped = []

    def term_at(n):
        if n == 500 and not stopped:
            workers[0].proc.send_signal(signal.SIGTERM)
            stopped.append(True)

    try:
        failures = load(gateway.url, 2000, 8, term_at)
        assert failures == [], f"{len(failures)} failed, first: {failures[:3]}"
        assert workers[0].proc.wait(timeout=60) == 0, "the drained worker exits 0"
    finally:
        assert gateway.stop() == 0
        assert workers[1].stop() == 0


def test_a_stream_survives_a_worker_sigkill():
    import queue

    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    got = queue.Queue()
    c = gateway.client
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        results = []
        for n in range(400):
            i = grpcclient.InferInput("input", [1, 64], "FP32")
            i.set_data_from_numpy(x)
            c.async_stream_infer("digits", [i], request_id=str(n))
            if n == 150:
                # Let part of the stream be answered, then kill a worker mid-stream.
                results += [got.get(timeout=60) for _ in range(100)]
                workers[0].proc.send_signal(signal.SIGKILL)
        results += [got.get(timeout=60) for _ in range(300)]
    finally:
        c.stop_stream()
    errors = [str(e) for _, e in results if e is not None]
    assert errors == [], errors[:3]
    # Ordered (the default): the answers come in the order the messages went out, the
    # retried ones included.
    assert [int(r.get_response().id) for r, _ in results] == list(range(400))
    assert gateway.stop() == 0
    workers[0].proc.wait(timeout=10)
    assert workers[1].stop() == 0


def test_a_stopped_worker_costs_no_request_and_comes_back():
    """SIGSTOP: the process is alive and its connection open, but nothing answers — no
    reset to react to. The gateway's keepalive PINGs go unanswered, the connection is
    closed, the requests on it are retried on the other worker; after SIGCONT the worker
    is back in rotation and gets traffic again (its hung requests do not shun it)."""
    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    stopped = []

    def stop_at(n):
        if n == 200 and not stopped:
            workers[0].proc.send_signal(signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        failures = load(gateway.url, 800, 8, stop_at)
        assert stopped and failures == [], failures[:3]
        workers[0].proc.send_signal(signal.SIGCONT)
        before = executions(workers[0].url)
        deadline = time.monotonic() + 60
        while executions(workers[0].url) == before:
            assert time.monotonic() < deadline, "the resumed worker never got traffic again"
            assert load(gateway.url, 40, 4, lambda n: None) == []
    finally:
        if workers[0].proc.poll() is None:
            workers[0].proc.send_signal(signal.SIGCONT)
        gateway.stop()
        for w in workers:
            w.stop()


def test_an_ordered_stream_with_timeouts_does_not_stall_behind_a_stopped_worker():
    """SIGSTOP with keepalive too slow to notice: a stream message's own Triton `timeout`
    gives its attempt a bound, so a message stuck on the stopped worker is cut and retried
    on the other one, and the ordered stream goes on instead of waiting for the worker."""
    import queue

    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers, extra=("--worker-keepalive-interval", "60s",
                                       "--worker-keepalive-timeout", "60s"))
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    got = queue.Queue()
    c = gateway.client
    c.start_stream(callback=lambda result, error: got.put((result, error)))

    def send(n):
        i = grpcclient.InferInput("input", [1, 64], "FP32")
        i.set_data_from_numpy(x)
        c.async_stream_infer("digits", [i], request_id=str(n), timeout=5_000_000)  # µs

    try:
        results = []
        for n in range(60):  # the gateway learns the model's p99 (32 answers) on both
            send(n)
            results.append(got.get(timeout=30))
        workers[0].proc.send_signal(signal.SIGSTOP)
        for n in range(60, 100):
            send(n)
        # Without a bound the messages on the stopped worker would wait for its 60 s
        # keepalive; each is cut at its bound (at most half of its 5 s) and retried.
        results += [got.get(timeout=20) for _ in range(40)]
    finally:
        if workers[0].proc.poll() is None:
            workers[0].proc.send_signal(signal.SIGCONT)
        c.stop_stream()
    errors = [str(e) for _, e in results if e is not None]
    assert errors == [], errors[:3]
    assert [int(r.get_response().id) for r, _ in results] == list(range(100))
    assert gateway.stop() == 0
    for w in workers:
        assert w.stop() == 0


def executions(url):
    c = grpcclient.InferenceServerClient(url)
    return c.get_inference_statistics("digits").model_stats[0].execution_count


def test_a_worker_slowed_by_cpu_load_is_not_ejected():
    """Slow but answering is busy, not broken: with one worker pinned to a core that three
    busy loops also want, requests still succeed, none is lost, and the gateway ejects
    nobody (its keepalive PINGs are answered, late or not)."""
    import re
    import subprocess
    import sys
    import urllib.request

    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    burners = []
    try:
        # Every thread of worker 0 onto CPU 0, with three busy loops there too.
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(workers[0].proc.pid)], check=True,
                       capture_output=True)
        burners = [subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
                   for _ in range(3)]
        assert load(gateway.url, 400, 8, lambda n: None) == []
        port = gateway.metrics_url.rsplit(":", 1)[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        ejections = [float(v) for v in re.findall(r"^infermesh_gateway_worker_ejections_total\{[^}]*\} (\S+)",
                                                   text, re.M)]
        assert sum(ejections) == 0, ejections
        assert executions(workers[0].url) > 0, "the slow worker still served"
    finally:
        for b in burners:
            b.kill()
            b.wait(timeout=10)
        gateway.stop()
        for w in workers:
            w.stop()
