"""The worker's response cache on the MLP at concurrency 32 with a 90 % repeat rate (nine
requests in ten the same, the tenth unique), cache on vs off, in one run: the same worker
binary and model config (`response_cache { enable: true }`), with and without
`--cache-config local,size=BYTES`; the rounds alternate which goes first. Load by wrk (one
thread, HTTP/1.1 keep-alive) on the HTTP door with Triton's binary tensor data
(bench/peer_apps/wrk_repeat.lua). Prints requests/s, p50/p99, the worker's CPU per request
and its hit rate (ModelStatistics), and each round's ratio.

Run through bench/cache.sh (BENCH_BUILD=0 keeps the release binaries as they are)."""
import argparse
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import rest  # noqa: E402

CORES = os.cpu_count() or 1


def hits(http: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://{http}/v2/models/mlp/stats", timeout=10) as r:
        s = json.load(r)["model_stats"][0]["inference_stats"]
    return int(s["cache_hit"].get("count", 0)), int(s["cache_miss"].get("count", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(h.ROOT / "target/release"))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "5")))
    ap.add_argument("--concurrency", default="32", help="comma-separated levels, e.g. 1,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-bytes", type=int, default=64 << 20)
    args = ap.parse_args()
    bin_dir = pathlib.Path(args.bin_dir).resolve()
    work = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-cache-bench-"))
    repo = work / "models"
    (repo / "mlp/1").mkdir(parents=True)
    (repo / "mlp/1/model.onnx").symlink_to(rest.MLP)
    (repo / "mlp/config.pbtxt").write_text("max_batch_size: 64\ndynamic_batching { }\nresponse_cache { enable: true }\n")
    b = rest.bodies(work)
    rows, reference = [], None
    for n in range(args.rounds):
        order = ("off", "on") if n % 2 == 0 else ("on", "off")
        for mode in order:
            procs = h.Procs(work)
            try:
                extra = ("--cache-config", f"local,size={args.cache_bytes}") if mode == "on" else ()
                _, http = rest.start_worker(bin_dir, procs, repo, extra)
                roles = {"worker": h.descendants(procs.started[0][1].pid)}
                h.wait_until(lambda: rest.ready(http), "worker", procs)
                got = rest.answer(http, b["json"])
                reference = reference or got
                assert got == reference, "the cached worker answers what the engine does"
                for level, c in enumerate(int(x) for x in args.concurrency.split(",")):
                    before = hits(http)
                    meter = h.Meter(roles)
                    r = h.http_load(f"http://{http}/v2/models/mlp/infer", c, args.seconds, b["binary"],
                                    b["header_len"], script="wrk_repeat.lua",
                                    extra=(b["header_len"], level * 10_000_000))
                    r["server"] = meter.done(r["ok"])
                    after = hits(http)
                    looked = (after[0] - before[0]) + (after[1] - before[1])
                    r["hit_rate"] = (after[0] - before[0]) / looked if looked else 0.0
                    rows.append({"round": n + 1, "cache": mode, "c": c, **r})
                    print(f"round {n + 1} cache {mode} c={c}: {r['rps']:.0f}/s, hit rate {r['hit_rate']:.2f}, "
                          f"{r['errors']} errors", file=sys.stderr)
            finally:
                procs.stop()
    report(args, rows)


def report(args, rows) -> None:
    print(f"`{shlex.join(['bench/cache.sh', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; the MLP at batch 1, "
          f"dynamic batching; {CORES} cores shared by the worker and wrk; "
          f"{args.seconds:g} s per row; 9 requests in 10 repeat one body, the 10th is unique)\n")
    print("| round | c | cache | req/s | p50 ms | p99 ms | worker CPU µs / req | hit rate | req/s vs off | CPU vs off |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    cpu = {id(r): r["server"]["worker"]["cpu_s"] / max(r["ok"], 1) * 1e6 for r in rows}
    off = {(r["round"], r["c"]): r for r in rows if r["cache"] == "off"}
    for r in sorted(rows, key=lambda r: (r["c"], r["round"], r["cache"] == "on")):
        base = off.get((r["round"], r["c"]))
        vs = f"{r['rps'] / base['rps']:.2f}×" if base and base["rps"] else ""
        cvs = f"{cpu[id(r)] / cpu[id(base)]:.2f}×" if base and cpu[id(base)] else ""
        print(f"| {r['round']} | {r['c']} | {r['cache']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {cpu[id(r)]:.0f} | {r['hit_rate']:.2f} | {vs} | {cvs} |")
    errors = [r for r in rows if r["errors"]]
    if errors:
        print("\nerrors: " + ", ".join(f"round {r['round']} c={r['c']} cache {r['cache']}: {r['errors']}"
                                        for r in errors))


if __name__ == "__main__":
    main()
