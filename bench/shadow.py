"""Shadow traffic's cost, in one run: two workers serving the bundled MLP as versions 1
and 2 (the same file), three gateways in front of them — without a shadow rule, shadowing
25 % and 100 % of version 1's answered requests to version 2 — driven in turn by
`infermesh bench` at concurrency 8 (interleaved rounds). Prints client p50/p99 of each
(medians of the rounds), the gateway's CPU per client request and what shadowing adds to
it, the workers' CPU per client request, and the shadow results (from `infermesh routes`).
Release builds; run through bench/shadow.sh."""
import argparse
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from gateway import cpu_seconds  # noqa: E402
from hedge import Fleet  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUPS = {
    "no shadow": 'models:\n  mlp:\n    split: {"1": 1}\n',
    "shadow 25 %": 'models:\n  mlp:\n    split: {"1": 1}\n    shadow: {target: {version: 2}, percent: 25}\n',
    "shadow 100 %": 'models:\n  mlp:\n    split: {"1": 1}\n    shadow: {target: {version: 2}}\n',
}


def repo(d: pathlib.Path) -> pathlib.Path:
    for v in (1, 2):
        (d / "mlp" / str(v)).mkdir(parents=True)
        shutil.copy(ROOT / "models/mlp/1/model.onnx", d / "mlp" / str(v) / "model.onnx")
    (d / "mlp" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nversion_policy: { all: { } }\n')
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "5")))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    bins = pathlib.Path(args.bin_dir)
    cli = bins / "infermesh"
    d = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-shadow-bench-"))
    fleet = Fleet(bins)
    results = {name: [] for name in SETUPS}
    shadows = {}
    try:
        root = repo(d / "repo")
        workers = [fleet.start("infermesh-worker", ["--model-repository", str(root), "--intra-op-threads", "1"])
                   for _ in range(2)]
        worker_pids = [pid for _, pid in workers]
        gateways = {}
        for name, text in SETUPS.items():
            routes = d / f"{name.replace(' ', '-').replace('%', 'pc')}.yaml"
            routes.write_text(text)
            gateways[name] = fleet.start("infermesh-gateway", [
                "--workers", ",".join(f"127.0.0.1:{p}" for p, _ in workers), "--routes", str(routes)])
        names = list(SETUPS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                port, pid = gateways[name]
                before, wbefore = cpu_seconds([pid]), cpu_seconds(worker_pids)
                out = subprocess.run([str(cli), "bench", "--url", f"127.0.0.1:{port}", "--model", "mlp",
                                      "--concurrency", str(args.concurrency), "--duration", f"{args.seconds:g}s",
                                      "--json"], capture_output=True, text=True, check=True)
                got = json.loads(out.stdout)
                ok = max(got["ok"], 1)
                got["cpu_us"] = (cpu_seconds([pid]) - before) / ok * 1e6
                got["worker_cpu_us"] = (cpu_seconds(worker_pids) - wbefore) / ok * 1e6
                results[name].append(got)
                print(f"round {r + 1} {name}: p50 {got['p50_ms']:.2f} ms, p99 {got['p99_ms']:.2f} ms, "
                      f"gateway {got['cpu_us']:.1f} µs/req", file=sys.stderr)
        for name, (port, _) in gateways.items():
            out = subprocess.run([str(cli), "routes", "--url", f"127.0.0.1:{port}", "--json"],
                                 capture_output=True, text=True, check=True)
            shadows[name] = json.loads(out.stdout)["models"][0].get("shadow")
    finally:
        fleet.stop()
        shutil.rmtree(d, ignore_errors=True)
    report(args, results, shadows)


def report(args, results, shadows):
    print(f"`{shlex.join(['bench/shadow.sh', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; the bundled MLP "
          f"as versions 1 and 2 on 2 workers (1 intra-op thread each), clients on version 1, copies to version 2; "
          f"concurrency {args.concurrency}; medians of {args.rounds} interleaved rounds of {args.seconds:g} s)\n")
    print("| gateway | req/s | p50 ms | p99 ms | gateway CPU µs / req | added | worker CPU µs / req "
          "| copies: agree / disagree / error / dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    keys = ("requests_per_s", "p50_ms", "p99_ms", "cpu_us", "worker_cpu_us")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in results.items()}
    base = med["no shadow"]["cpu_us"]
    for name, m in med.items():
        s = shadows.get(name)
        copies = f"{s['agree']} / {s['disagree']} / {s['error']} / {s['dropped']}" if s else ""
        added = "" if name == "no shadow" else f"{m['cpu_us'] - base:+.1f}"
        print(f"| {name} | {m['requests_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['cpu_us']:.1f} "
              f"| {added} | {m['worker_cpu_us']:.1f} | {copies} |")


if __name__ == "__main__":
    main()
