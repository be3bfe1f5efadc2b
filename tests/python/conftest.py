"""Fixtures: a real infermesh worker process on 127.0.0.1 with the bundled models."""
import json
import os
import pathlib
import subprocess
import threading
import time

import pytest
import tritonclient.grpc as grpcclient

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
# Models with variable dims (BYTES, FP32, FP16 and an ONNX one) for the hostile-input tests.
HOSTILE = ROOT / "tests" / "models"


def binary(name: str) -> str:
    return os.environ.get(f"INFERMESH_{name.upper().replace('-', '_')}_BIN") or str(ROOT / "target" / "debug" / name)


class Server:
    """A worker or gateway process on 127.0.0.1, its port learned from its log."""

    def __init__(self, cmd, env=None, tls=None, headers=None):
        """`tls`: tritonclient's TLS arguments (ssl, root_certificates, ...) for a server
        whose gRPC port speaks TLS; `headers`: what the readiness check sends (a token)."""
        # Later flags win, so callers may override the grace period. cmd[0] may be a list
        # (a binary and its subcommand: `infermesh gateway`).
        head = list(cmd[0]) if isinstance(cmd[0], (list, tuple)) else [cmd[0]]
        cmd = [*head, "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
               "--health-address", "127.0.0.1", "--health-port", "0",
               "--shutdown-grace", "0s", "--log-format", "json", *cmd[1:]]
        env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        self.url = None
        # The bound address is logged first thing; read until it appears (bounded).
        deadline = time.monotonic() + 60
        for line in self.proc.stderr:
            try:
                fields = json.loads(line).get("fields", {})
            except json.JSONDecodeError:
                continue
            if "address" in fields:
                self.url = fields["address"]
                self.metrics_url = fields.get("metrics")
                self.health_url = fields.get("health")
                self.http_url = fields.get("http")
                break
            if time.monotonic() > deadline:
                break
        assert self.url, "worker did not log its address"
        # Keep draining the log so the worker never blocks on a full pipe.
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.client = grpcclient.InferenceServerClient(self.url, **(tls or {}))
        while not self.client.is_server_ready(headers=headers):
            assert time.monotonic() < deadline and self.proc.poll() is None, f"{cmd[0]} not ready"
            time.sleep(0.05)

    def stop(self) -> int:
        self.client.close()
        self.proc.terminate()
        return self.proc.wait(timeout=60)


def wait_for(what, check, timeout=60):
    """Polls `check` until it holds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.05)


def Worker(*extra: str, env=None) -> Server:
    return Server([binary("infermesh-worker"), "--model-repository", str(MODELS), *extra], env)


def Gateway(*workers: Server, extra=(), env=None) -> Server:
    return Server([binary("infermesh-gateway"), "--workers", ",".join(w.url for w in workers),
                   "--worker-refresh", "100ms", *extra], env)


@pytest.fixture(scope="session")
def worker():
    w = Worker()
    yield w
    assert w.stop() == 0, "worker exits 0 on SIGTERM"


@pytest.fixture(scope="session")
def mesh():
    """A gateway in front of two worker processes."""
    workers = [Worker("--intra-op-threads", "1"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    yield gateway, workers
    assert gateway.stop() == 0, "gateway exits 0 on SIGTERM"
    for w in workers:
        assert w.stop() == 0


@pytest.fixture
def client(worker):
    return worker.client


@pytest.fixture(scope="module")
def fleet():
    """One gateway in front of two workers serving the variable-dims test repository."""
    workers = [Worker("--model-repository", str(HOSTILE)) for _ in range(2)]
    gateway = Gateway(*workers)
    yield gateway, workers
    assert gateway.stop() == 0
    for w in workers:
        assert w.stop() == 0
