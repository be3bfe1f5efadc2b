"""Readiness never lies: a worker whose model repository path is wrong refuses to start
(saying which path and flag), and one whose repository has no models never reports
SERVING in model-control mode none."""
import json
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import binary


def test_a_missing_repository_stops_the_worker_with_the_reason(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    out = subprocess.run([binary("infermesh-worker"), "--model-repository", str(missing),
                          "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert str(missing) in out.stderr and "--model-repository" in out.stderr, out.stderr[-2000:]


def test_an_empty_repository_is_never_serving(tmp_path):
    proc = subprocess.Popen([binary("infermesh-worker"), "--model-repository", str(tmp_path),
                             "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
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
            for flags, what in [(["--grpc-port", str(port), "--metrics-port", "0"], "--grpc-port"),
                                (["--grpc-port", "0", "--metrics-port", str(port)], "--metrics-port")]:
                out = subprocess.run([binary(name), *target, "--grpc-address", "127.0.0.1",
                                      "--metrics-address", "127.0.0.1", *flags],
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode != 0, (name, flags)
                assert what in out.stderr and f"127.0.0.1:{port}" in out.stderr, (name, out.stderr[-1000:])
