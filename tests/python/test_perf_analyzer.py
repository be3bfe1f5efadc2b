"""Triton's perf_analyzer (C++, from the tritonclient wheel) against the worker, unary and
streaming. Loose stability settings: this checks that it runs cleanly (metadata, config,
statistics around every window), not how fast."""
import json
import re
import subprocess

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def mlp_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pa") / "mlp.json"
    path.write_text(json.dumps({"data": [{"input": [0.25] * 784}]}))
    return path


@pytest.mark.parametrize("mode", ["unary", "streaming"])
def test_perf_analyzer_runs_cleanly(worker, mlp_data, mode):
    cmd = [
        str(ROOT / "scripts" / "perf-analyzer.sh"),
        "-m", "mlp", "-u", worker.url, "-i", "grpc",
        "--input-data", str(mlp_data),
        "--measurement-mode", "count_windows", "--measurement-request-count", "50",
        "-s", "90", "--max-trials", "20", "--concurrency-range", "4",
    ]
    if mode == "streaming":
        cmd.append("--streaming")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", out.stdout).group(1))
    assert throughput > 0
    # The server side comes from ModelStatistics (listed in ServerMetadata extensions).
    assert re.search(r"Server:\s+Inference count: \d+", out.stdout), out.stdout[-2000:]


@pytest.fixture(scope="module")
def http_gateway(worker):
    from conftest import Gateway
    g = Gateway(worker)
    yield g
    g.stop()


@pytest.mark.parametrize("through", ["worker", "gateway"])
def test_perf_analyzer_over_http(worker, http_gateway, mlp_data, through):
    """-i http: binary tensor data both ways, config and statistics over REST."""
    url = (worker if through == "worker" else http_gateway).http_url
    cmd = [
        str(ROOT / "scripts" / "perf-analyzer.sh"),
        "-m", "mlp", "-u", url, "-i", "http",
        "--input-data", str(mlp_data),
        "--measurement-mode", "count_windows", "--measurement-request-count", "50",
        "-s", "90", "--max-trials", "20", "--concurrency-range", "4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert float(re.search(r"Throughput: ([\d.]+) infer/sec", out.stdout).group(1)) > 0
    assert re.search(r"Server:\s+Inference count: \d+", out.stdout), out.stdout[-2000:]
