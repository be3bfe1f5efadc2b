"""Hedging against a slow worker, in one run: three workers behind one gateway each time,
two fast (the identity backend, 1 ms per request) and one that stalls (by default 5 % of
its requests take 50 ms: a worker's tail, which no balancer can see coming; with
--stall-rate 1 it is always slow), driven by
`infermesh bench` at concurrency 8; the gateway without a routing file, and with
`hedge: {after: p95}` and `hedge: {after_ms: 5}`. Prints p50/p99 of each (the median of
interleaved rounds), the gateway's CPU per request and what hedging adds to it, and the
hedges sent and won (from `infermesh routes`). Release builds; run through bench/hedge.sh."""
import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from gateway import cpu_seconds, free_port  # noqa: E402
from hop import healthy  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ('backend: "identity"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
         'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
         'instance_group [ { count: 4 kind: KIND_CPU } ]\n'
         'parameters { key: "delay_ms" value: { string_value: "1" } }\n'
         'parameters { key: "stall_rate" value: { string_value: "%s" } }\n'
         'parameters { key: "stall_ms" value: { string_value: "%s" } }\n')
SETUPS = {
    "no hedging": "models: {}\n",
    "hedge after p95": "models:\n  canary:\n    hedge: {after: p95}\n",
    "hedge after 5 ms": "models:\n  canary:\n    hedge: {after_ms: 5}\n",
}


def repo(d: pathlib.Path, stall_rate: float, stall_ms: float) -> pathlib.Path:
    (d / "canary" / "1").mkdir(parents=True)
    (d / "canary" / "config.pbtxt").write_text(MODEL % (stall_rate, stall_ms))
    return d


class Fleet:
    def __init__(self, bins: pathlib.Path):
        self.bins, self.procs = bins, []

    def start(self, binary, flags):
        port, health = free_port(), free_port()
        p = subprocess.Popen([str(self.bins / binary), "--grpc-address", "127.0.0.1", "--grpc-port", str(port),
                              "--health-address", "127.0.0.1", "--health-port", str(health),
                              "--allow-metrics", "false", "--shutdown-grace", "0s", *flags],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        healthy(self.bins / "infermesh", health)
        return port, p.pid

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "5")))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    ap.add_argument("--stall-rate", type=float, default=0.05, help="share of the slow worker's requests that stall")
    ap.add_argument("--stall-ms", type=float, default=50.0)
    ap.add_argument("--stalling-workers", type=int, choices=(1, 2, 3), default=1,
                    help="how many of the three workers stall (3: a tail no balancer can avoid)")
    args = ap.parse_args()
    bins = pathlib.Path(args.bin_dir)
    cli = bins / "infermesh"
    d = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-hedge-bench-"))
    fast, slow = repo(d / "fast", 0, 0), repo(d / "slow", args.stall_rate, args.stall_ms)
    fleet = Fleet(bins)
    results = {name: [] for name in SETUPS}
    counts = {}
    try:
        kinds = [fast] * (3 - args.stalling_workers) + [slow] * args.stalling_workers
        workers = [fleet.start("infermesh-worker", ["--model-repository", str(r)])[0] for r in kinds]
        gateways = {}
        for name, text in SETUPS.items():
            routes = d / f"{name.replace(' ', '-')}.yaml"
            routes.write_text(text)
            gateways[name] = fleet.start("infermesh-gateway", [
                "--workers", ",".join(f"127.0.0.1:{w}" for w in workers), "--routes", str(routes)])
        names = list(SETUPS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                port, pid = gateways[name]
                before = cpu_seconds([pid])
                out = subprocess.run([str(cli), "bench", "--url", f"127.0.0.1:{port}", "--model", "canary",
                                      "--concurrency", "8", "--duration", f"{args.seconds:g}s", "--json"],
                                     capture_output=True, text=True, check=True)
                got = json.loads(out.stdout)
                got["cpu_us"] = (cpu_seconds([pid]) - before) / max(got["ok"], 1) * 1e6
                results[name].append(got)
                print(f"round {r + 1} {name}: p50 {got['p50_ms']:.2f} ms, p99 {got['p99_ms']:.2f} ms", file=sys.stderr)
        for name, (port, _) in gateways.items():
            out = subprocess.run([str(cli), "routes", "--url", f"127.0.0.1:{port}", "--json"],
                                 capture_output=True, text=True, check=True)
            models = json.loads(out.stdout)["models"]
            counts[name] = models[0]["hedging"] if models else None
    finally:
        fleet.stop()
    report(args, results, counts)


def report(args, results, counts):
    print(f"`{shlex.join(['bench/hedge.sh', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; identity backend, "
          f"{3 - args.stalling_workers} of 3 workers at 1 ms, {args.stalling_workers} whose requests take "
          f"{args.stall_ms:g} ms {100 * args.stall_rate:g} % of the time (the model paused meanwhile), 1 ms otherwise; "
          f"4 instances each; concurrency 8; "
          f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s)\n")
    print("| gateway | req/s | p50 ms | p99 ms | p99.9 ms | max ms | gateway CPU µs / req | added CPU | hedged | won |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = ("requests_per_s", "p50_ms", "p99_ms", "p999_ms", "max_ms", "cpu_us")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in results.items()}
    base = med["no hedging"]["cpu_us"]
    for name, m in med.items():
        h = counts.get(name)
        hedged = f"{h['hedged']} ({100 * h['hedge_rate']:.1f}%)" if h else ""
        won = f"{h['won']} ({100 * h['win_rate']:.0f}%)" if h else ""
        added = "" if name == "no hedging" else f"{m['cpu_us'] - base:+.1f}"
        print(f"| {name} | {m['requests_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['p999_ms']:.2f} "
              f"| {m['max_ms']:.1f} "
              f"| {m['cpu_us']:.1f} | {added} | {hedged} | {won} |")


if __name__ == "__main__":
    main()
