"""Stateful sequences: throughput of 64 concurrent sequences at batch 1 per request, the
sequence batcher's `oldest` strategy beside `direct`, on one worker and through a gateway
in front of it. The client is Triton's perf_analyzer, which reads the model's config and
drives sequences itself (each of its 64 contexts runs one sequence at a time, START to
END, a request in flight at a time); the running-sum model of bench/stateful_models.py
(implicit state, max_batch_size 8). CPU per request is the servers' own (/proc).
"""
import argparse
import pathlib
import re
import shlex
import sys
import tempfile

import harness as h
from placement import SERVER_FLAGS, listening, metric
from stateful_models import write

ROOT = h.ROOT


def start(bin_dir, procs, repo, gateway: bool):
    common = SERVER_FLAGS
    w = procs.start("worker", [str(bin_dir / "infermesh-worker"), "--model-repository", str(repo), *common])
    wurl, wmetrics = listening(procs, "worker")
    pids = {"worker": [w.pid]}
    url, metrics = wurl, wmetrics
    if gateway:
        g = procs.start("gateway", [str(bin_dir / "infermesh-gateway"), "--workers", wurl, *common])
        url, _ = listening(procs, "gateway")
        pids["gateway"] = [g.pid]
    import tritonclient.grpc as grpcclient
    c = grpcclient.InferenceServerClient(url)
    h.wait_until(lambda: c.is_model_ready("accumulate") and c.is_model_ready("accumulate_direct"),
                 "models ready", procs)
    c.close()
    return url, wmetrics, pids


def perf(url, model, args) -> tuple[dict, list[str]]:
    cmd = [str(ROOT / "scripts/perf-analyzer.sh"), "-m", model, "-u", url, "-i", "grpc",
           "--concurrency-range", str(args.sequences), "--sequence-length", str(args.length),
           "--measurement-interval", str(args.window_ms), "-s", "20", "--max-trials", "6"]
    out, _, _ = h.run_measured(cmd, 600)
    num = lambda pattern: float(re.search(pattern, out).group(1))  # noqa: E731
    return {"rps": num(r"Throughput: ([\d.]+) infer/sec"),
            "p50_ms": num(r"p50 latency: (\d+) usec") / 1000,
            "p99_ms": num(r"p99 latency: (\d+) usec") / 1000,
            "batch": num(r"Inference count: (\d+)") / num(r"Execution count: (\d+)")}, cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--sequences", type=int, default=64, help="concurrent sequences")
    ap.add_argument("--length", type=int, default=20, help="requests per sequence")
    ap.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's measurement window")
    args = ap.parse_args()
    bin_dir = pathlib.Path(args.bin_dir).resolve()
    work = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-sequences-bench-"))
    repo = write(work / "models")
    rows, cmds = [], []
    for path in ("worker", "gateway"):
        procs = h.Procs(work)
        try:
            url, wmetrics, pids = start(bin_dir, procs, repo, path == "gateway")
            for model, strategy in (("accumulate", "oldest"), ("accumulate_direct", "direct")):
                before = metric(wmetrics, "infermesh_requests_total", model=model)
                meter = h.Meter(pids)
                r, cmd = perf(url, model, args)
                served = metric(wmetrics, "infermesh_requests_total", model=model) - before
                cpu = meter.done(int(served))
                errors = metric(wmetrics, "infermesh_requests_total", model=model) - metric(
                    wmetrics, "infermesh_requests_total", model=model, code="Ok")
                r.update(path=path, strategy=strategy, served=served, errors=errors,
                         cpu_us={role: c["cpu_s"] * 1e6 / served for role, c in cpu.items()})
                rows.append(r)
                cmds.append(" ".join(shlex.quote(x) for x in cmd))
        finally:
            procs.stop()
    print(f"\n{args.sequences} concurrent sequences of {args.length} requests, batch 1 per request, "
          "running-sum model with implicit state (max_batch_size 8, one instance)\n")
    print("| path | strategy | req/s | oldest/direct | p50 ms | p99 ms | rows per batch | worker CPU µs/req | gateway CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        direct = next(x for x in rows if x["path"] == r["path"] and x["strategy"] == "direct")
        ratio = f"{r['rps'] / direct['rps']:.2f}×" if r["strategy"] == "oldest" else ""
        gw = f"{r['cpu_us']['gateway']:.0f}" if "gateway" in r["cpu_us"] else ""
        print(f"| {r['path']} | {r['strategy']} | {r['rps']:.0f} | {ratio} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['batch']:.2f} | {r['cpu_us']['worker']:.0f} | {gw} | {int(r['errors'])} |")
    print("\ncommand: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("client (each row, the model and address filled in): " + cmds[0])


if __name__ == "__main__":
    main()
