"""Readiness never lies: a worker whose model repository path is wrong refuses to start
(saying which path and flag); a worker is SERVING only while a model is ready (unless
--allow-empty-repository); the gateway's per-model health follows its workers, and a
dead worker is reported at once with its cause."""
import json
import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import MODELS, Gateway, Worker, binary, wait_for


def test_a_missing_repository_stops_the_worker_with_the_reason(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    out = subprocess.run([binary("infermesh-worker"), "--model-repository", str(missing),
                          "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert str(missing) in out.stderr and "--model-repository" in out.stderr, out.stderr[-2000:]


def test_an_empty_repository_is_never_serving(tmp_path):
    proc = subprocess.Popen([binary("infermesh-worker"), "--model-repository", str(tmp_path),
                             "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0",
                             "--log-format", "json", "--shutdown-grace", "0s"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url, said = None, None
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            fields = json.loads(line).get("fields", {}) if line.startswith("{") else {}
            url = url or fields.get("address")
            if "no models" in fields.get("message", ""):
                said = fields["message"]
                break
            assert time.monotonic() < deadline
        assert url and said, (url, said)
        with grpc.insecure_channel(url) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_a_port_clash_names_the_port_and_its_flags():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name in ["infermesh-worker", "infermesh-gateway"]:
            target = ["--model-repository", "/tmp"] if name == "infermesh-worker" else ["--workers", "127.0.0.1:9"]
            for flags, what in [(["--grpc-port", str(port), "--health-port", "0", "--metrics-port", "0"], "--grpc-port"),
                                (["--grpc-port", "0", "--health-port", "0", "--metrics-port", str(port)], "--metrics-port")]:
                out = subprocess.run([binary(name), *target, "--grpc-address", "127.0.0.1",
                                      "--metrics-address", "127.0.0.1", *flags],
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode != 0, (name, flags)
                assert what in out.stderr and f"127.0.0.1:{port}" in out.stderr, (name, out.stderr[-1000:])


def health(url, service=""):
    """The health status, or None while the name is not registered (NOT_FOUND)."""
    with grpc.insecure_channel(url) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=10).status
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def started(*flags):
    """A worker process and its address, once its start set has been tried."""
    proc = subprocess.Popen([binary("infermesh-worker"), "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--health-port", "0",
                             "--metrics-port", "0", "--log-format", "json", "--shutdown-grace", "0s", *flags],
                            stderr=subprocess.PIPE, text=True)
    url, metrics = None, None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        fields = json.loads(line).get("fields", {}) if line.startswith("{") else {}
        url, metrics = url or fields.get("address"), metrics or fields.get("metrics")
        if any(s in fields.get("message", "") for s in ("SERVING", "no model")):
            break
        assert time.monotonic() < deadline
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    return proc, url, metrics


def stop(proc):
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_allow_empty_repository_serves_with_nothing_loaded(tmp_path):
    proc, url, _ = started("--model-repository", str(tmp_path), "--allow-empty-repository")
    try:
        assert health(url) == SERVING
    finally:
        stop(proc)


def test_explicit_mode_is_serving_only_while_a_model_is_ready(tmp_path):
    shutil.copytree(MODELS / "mlp", tmp_path / "mlp")
    proc, url, _ = started("--model-repository", str(tmp_path), "--model-control-mode", "explicit")
    try:
        assert health(url) == NOT_SERVING, "nothing loaded: not in a Service's endpoints"
        c = grpcclient.InferenceServerClient(url)
        c.load_model("mlp")
        wait_for("SERVING after a load", lambda: health(url) == SERVING)
        assert c.is_server_ready()
        c.unload_model("mlp")
        wait_for("NOT_SERVING after the last unload", lambda: health(url) == NOT_SERVING)
        assert not c.is_server_ready()
        c.close()
    finally:
        stop(proc)


def test_a_repository_that_vanishes_in_poll_mode_keeps_loaded_models_serving(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "mlp", repo / "mlp")
    proc, url, metrics = started("--model-repository", str(repo), "--model-control-mode", "poll",
                                 "--repository-poll-secs", "0.05")
    try:
        assert health(url) == SERVING
        repo.rename(tmp_path / "gone")
        port = metrics.rsplit(":", 1)[1]

        def failures():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return sum(float(l.split()[-1]) for l in text.splitlines()
                       if l.startswith("infermesh_repository_poll_failures_total"))
        wait_for("a failed poll is counted", lambda: failures() >= 2)
        assert health(url) == SERVING and health(url, "mlp") == SERVING
        c = grpcclient.InferenceServerClient(url)
        x = grpcclient.InferInput("input", [1, 784], "FP32")
        x.set_data_from_numpy(np.ones((1, 784), np.float32))
        assert c.infer("mlp", [x]).as_numpy("output").shape == (1, 10)
        c.close()
    finally:
        stop(proc)


def test_gateway_health_per_model_follows_the_workers_that_have_it(tmp_path):
    only_mlp = tmp_path / "repo"
    shutil.copytree(MODELS / "mlp", only_mlp / "mlp")
    small = Worker("--model-repository", str(only_mlp))
    full = Worker()
    gateway = Gateway(small, full)
    try:
        wait_for("digits registered", lambda: health(gateway.url, "digits") == SERVING)
        assert health(gateway.url, "mlp") == SERVING
        assert full.stop() == 0
        wait_for("digits NOT_SERVING once its only worker left",
                 lambda: health(gateway.url, "digits") == NOT_SERVING)
        assert health(gateway.url, "mlp") == SERVING and health(gateway.url) == SERVING
    finally:
        gateway.stop()
        small.stop()


def test_a_dead_worker_is_reported_at_once_with_the_cause():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.Popen([binary("infermesh-gateway"), "--workers", dead, "--grpc-address", "127.0.0.1",
                             "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0", "--log-format", "json",
                             "--shutdown-grace", "0s", "--worker-refresh", "100ms"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url, said = None, None
        for line in proc.stderr:
            fields = json.loads(line).get("fields", {}) if line.startswith("{") else {}
            url = url or fields.get("address")
            if fields.get("message") == "worker not ready":
                said = fields
                break
        threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
        assert said and said["worker"] == dead and "refused" in said["problem"].lower(), said
        out = subprocess.run([binary("infermesh"), "models", "--url", url], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        line = next(l for l in out.stdout.splitlines() if l.startswith(dead))
        assert "unready" in line and "refused" in line.lower(), out.stdout
    finally:
        stop(proc)
