"""ONNX Runtime alone (in-process, `infermesh bench engine`) vs the infermesh worker under
Triton's perf_analyzer, batch-1 MLP requests, batching off and on, concurrency 1/8/32.
Prints one markdown table with ratios against ONNX Runtime's best batch."""
import argparse
import csv
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_baseline(seconds: float) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "infermesh"), "bench", "engine", "--model", str(ROOT / "models/mlp/1/model.onnx"),
         "--batch-sizes", "1,8,16,32,64", "--seconds", str(seconds), "--json"],
        check=True, capture_output=True, text=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def repo(batch_config: str) -> pathlib.Path:
    d = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-bench-"))
    for name, cfg in {"mlp_batched": batch_config, "mlp_unbatched": "max_batch_size: 64\n"}.items():
        (d / name / "1").mkdir(parents=True)
        (d / name / "1" / "model.onnx").symlink_to(ROOT / "models/mlp/1/model.onnx")
        (d / name / "config.pbtxt").write_text(cfg)
    return d


def perf(url: str, model: str, concurrency: int, data: pathlib.Path, requests: int) -> dict:
    csv_path = data.parent / f"{model}-{concurrency}.csv"
    cmd = [
        str(ROOT / "scripts/perf-analyzer.sh"), "-m", model, "-u", url, "-i", "grpc",
        "--input-data", str(data), "--measurement-mode", "count_windows",
        "--measurement-request-count", str(requests), "-s", "25", "--max-trials", "10",
        "--concurrency-range", str(concurrency), "-f", str(csv_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"perf_analyzer failed for {model} c={concurrency}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    row = next(csv.DictReader(csv_path.open()))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def own_client(url: str, model: str, concurrency: int, streaming: bool, seconds: float) -> dict:
    cmd = [str(BIN / "infermesh"), "bench", "--url", url, "--model", model, "--concurrency", str(concurrency),
           "--duration", f"{seconds}s", "--json"] + (["--streaming"] if streaming else [])
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"throughput": r["inferences_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "requests": r["ok"]}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measured(worker_pid: int, run) -> dict:
    """Runs one client, adding the worker's and the client's CPU µs per request (for
    perf_analyzer the request count is throughput × its wall time, so a slight under-count
    of its CPU per request: its start-up runs no requests)."""
    t0, w0, c0 = time.monotonic(), cpu_seconds(worker_pid), children_cpu()
    r = run()
    n = r.get("requests") or r["throughput"] * (time.monotonic() - t0)
    r["worker_us"] = 1e6 * (cpu_seconds(worker_pid) - w0) / n
    r["client_us"] = 1e6 * (children_cpu() - c0) / n
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds-per-row", type=float, default=3.0, help="engine time per batch size")
    ap.add_argument("--requests", type=int, default=1000, help="perf_analyzer requests per window")
    ap.add_argument("--max-queue-delay-us", type=int, default=0)
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} cores; ONNX Runtime intra-op threads = cores in both", file=sys.stderr)
    base = engine_baseline(args.seconds_per_row)
    best = max(base, key=lambda r: r["samples_per_s"])

    batch_config = f"max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {args.max_queue_delay_us} }}\n"
    d = repo(batch_config)
    data = d / "data.json"
    data.write_text(json.dumps({"data": [{"input": [((i % 97) / 97.0) for i in range(784)]}]}))
    port, mport = free_port(), free_port()
    worker = subprocess.Popen(
        [str(BIN / "infermesh-worker"), "--model-repository", str(d), "--grpc-address", "127.0.0.1",
         "--grpc-port", str(port), "--health-port", "0", "--metrics-port", str(mport), "--shutdown-grace", "0s"],
        stderr=subprocess.DEVNULL,
    )
    url = f"127.0.0.1:{port}"
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.1)
        rows = []
        for model, label in [("mlp_unbatched", "worker, batching off"), ("mlp_batched", "worker, dynamic batching")]:
            for c in (1, 8, 32):
                r = measured(worker.pid, lambda: perf(url, model, c, data, args.requests))
                rows.append((label, c, r))
                print(f"{label} c={c}: {r['throughput']:.0f}/s", file=sys.stderr)
        # The same worker driven by `infermesh bench`, a cheaper client on the same cores.
        for streaming in (False, True):
            label = f"worker, dynamic batching, infermesh bench {'stream' if streaming else 'unary'}"
            for c in (1, 8, 32):
                r = measured(worker.pid, lambda: own_client(url, "mlp_batched", c, streaming, args.seconds_per_row + 2))
                rows.append((label, c, r))
                print(f"{label} c={c}: {r['throughput']:.0f}/s", file=sys.stderr)
    finally:
        worker.terminate()
        worker.wait(timeout=60)

    print("\n### ONNX Runtime alone (in-process, no network)\n")
    print("| batch | samples/s | batch p50 ms | batch p99 ms |")
    print("|---:|---:|---:|---:|")
    for r in base:
        print(f"| {r['batch']} | {r['samples_per_s']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
    print(f"\n### Worker over gRPC (batch-1 requests; perf_analyzer unless said) vs ONNX Runtime's best batch "
          f"({best['batch']}: {best['samples_per_s']:.0f}/s)\n")
    print("| setup | concurrency | infer/s | p50 ms | p99 ms | vs ORT best | worker CPU µs / req | client CPU µs / req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, c, r in rows:
        ratio = r["throughput"] / best["samples_per_s"]
        print(f"| {label} | {c} | {r['throughput']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio:.0%} | "
              f"{r['worker_us']:.0f} | {r['client_us']:.0f} |")
    cpu_per_row = 1e6 * (os.cpu_count() or 1) / best["samples_per_s"]
    print(f"\nONNX Runtime alone at its best batch: {cpu_per_row:.0f} µs of CPU per row on {os.cpu_count()} cores.")


if __name__ == "__main__":
    main()
