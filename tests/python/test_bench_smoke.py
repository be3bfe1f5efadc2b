"""bench/peers.py on infermesh's own targets (ONNX Runtime in-process, the worker, the
gateway with 1 and 2 workers; unary and streaming) at tiny durations, so the benchmark
harness cannot rot: every target answers, with successful requests and no errors. Never a
timing: this machine's 2 cores are shared, and the numbers belong to the real benchmark."""
import json
import pathlib
import subprocess
import sys

from conftest import ROOT, binary

CONCURRENCY = (1, 4)


def test_every_infermesh_target_answers(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench/peers.py"), "--only", "infermesh",
           "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--seconds", "0.5", "--concurrency", ",".join(map(str, CONCURRENCY)), "--gateway-concurrency", "",
           "--engine-batches", "1,8", "--no-perf-analyzer", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "peers.json").exists(), run.stderr[-3000:]
    res = json.loads((tmp_path / "peers.json").read_text())
    assert res["failed"] == {}  # each setup's first error, by name
    assert run.returncode == 0, run.stderr[-3000:]

    assert [e["batch"] for e in res["engine"]] == [1, 8]
    assert all(e["samples_per_s"] > 0 for e in res["engine"])

    got = {(r["key"], r["mode"], r["concurrency"]) for r in res["rows"]}
    assert got == {(k, m, c) for k in ("worker", "gateway1", "gateway2") for m in ("unary", "stream")
                   for c in CONCURRENCY}
    for r in res["rows"]:
        assert r["ok"] > 0 and r["errors"] == 0, r
        # Each server process of the setup was found and read (CPU and peak RSS).
        assert set(r["server"]) == ({"worker"} if r["key"] == "worker" else
                                    {"gateway", "worker"} if r["key"] == "gateway1" else {"gateway", "workers"})
        assert all(v["hwm_mb"] > 0 for v in r["server"].values()), r["server"]

    table = (tmp_path / "peers.md").read_text()
    assert "| infermesh gateway + 2 workers | stream | 4 |" in table
    assert "| ONNX Runtime in-process, best batch" in table


def test_the_hop_benchmark_runs_every_setup():
    """bench/hop.py (nginx left out: it is installed by bench/hop.sh only) at tiny
    durations: every setup answers in every mode and the RSS table is read."""
    cmd = [sys.executable, str(ROOT / "bench/hop.py"), "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--seconds", "0.3", "--rounds", "1", "--no-nginx", "--streams", "20"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout
    for setup in ("worker alone", "gateway", "gateway, TLS both hops", "gateway, API key"):
        for mode, c in (("unary", 1), ("unary", 32), ("stream", 32)):
            assert f"| {setup} | {mode} | {c} |" in table, table
    assert "| gateway | " in table.split("RSS idle MB")[1], table


def test_the_shadow_benchmark_runs_every_setup():
    """bench/shadow.py at tiny durations: every setup answers and the copies of the
    shadowing setups agree (the two versions are the same file)."""
    cmd = [sys.executable, str(ROOT / "bench/shadow.py"), "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--seconds", "0.5", "--rounds", "1", "--concurrency", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    assert {"no shadow", "shadow 25 %", "shadow 100 %"} <= set(rows), run.stdout
    copies = rows["shadow 100 %"].rstrip(" |").rsplit("|", 1)[1].split("/")
    assert int(copies[0]) > 0 and int(copies[1]) == 0 and int(copies[2]) == 0, rows["shadow 100 %"]


def test_the_rest_benchmark_runs_every_door():
    """bench/rest.py without the FastAPI peer at tiny durations: gRPC (h2load) and HTTP JSON
    and binary (wrk) against the worker and through the gateway, no errors."""
    cmd = [sys.executable, str(ROOT / "bench/rest.py"), "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--seconds", "1", "--concurrency", "2", "--no-fastapi"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for setup in ("infermesh worker", "infermesh gateway + 1 worker"):
        for door in ("gRPC", "HTTP/JSON", "HTTP/binary"):
            assert f"| {setup} | {door} | 2 |" in run.stdout, run.stdout
    assert "errors:" not in run.stdout, run.stdout


def test_the_cache_benchmark_hits_nine_in_ten():
    """bench/cache.py at tiny durations: cache off never hits, cache on hits the repeated
    body (the unique tenth misses), no errors."""
    cmd = [sys.executable, str(ROOT / "bench/cache.py"), "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--seconds", "1", "--rounds", "1", "--concurrency", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[3].strip(): line.split("|") for line in run.stdout.splitlines() if line.startswith("| 1 ")}
    assert float(rows["off"][8]) == 0.0 and 0.8 <= float(rows["on"][8]) <= 0.95, run.stdout
    assert "errors:" not in run.stdout, run.stdout


def test_the_placement_benchmark_serves_every_trace():
    """bench/placement.py on a tiny catalog: every trace served without a failure, hit
    rates and Belady's beside them in the table, the baseline served only in part."""
    cmd = [sys.executable, str(ROOT / "bench/placement.py"), "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--models", "9", "--requests", "40", "--capacity-mib", "16"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| zipf") or line.startswith("| cyclic")]
    assert [r[1].strip() for r in rows] == ["zipf s=0.8", "zipf s=1.0", "zipf s=1.2", "cyclic sweep"], run.stdout
    for r in rows:
        assert 0 <= float(r[2]) <= 1 and 0 < float(r[3]) <= 1, r  # hit rate, Belady's
        assert int(r[12]) == 0, r  # failed
    assert "errors:" not in run.stdout, run.stdout


def test_sequences_bench_runs_both_strategies_on_both_paths():
    """bench/sequences.py, short: four rows (worker and gateway × oldest and direct),
    perf_analyzer's sequences served without an error."""
    cmd = [sys.executable, str(ROOT / "bench/sequences.py"), "--bin-dir", str(pathlib.Path(binary("infermesh")).parent),
           "--sequences", "16", "--length", "5", "--window-ms", "500"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in run.stdout.splitlines()
            if line.startswith("| worker") or line.startswith("| gateway")]
    assert [(r[0], r[1]) for r in rows] == [("worker", "oldest"), ("worker", "direct"),
                                            ("gateway", "oldest"), ("gateway", "direct")], run.stdout
    for r in rows:
        assert float(r[2]) > 0 and int(r[-1]) == 0, r
