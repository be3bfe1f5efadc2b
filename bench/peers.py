"""infermesh side by side with the stacks people use today, in one run on the same MLP
(784-1024-1024-10), the same input values and batch-1 requests: ONNX Runtime in-process,
the worker direct, the gateway with 1 and 2 workers, nginx grpc_pass in front of 2 workers,
FastAPI + uvicorn + ONNX Runtime (HTTP/JSON, driven by wrk) and KServe's Python model
server (v2 gRPC, driven by `infermesh bench`). Each setup gets fresh processes, stopped by
PID afterwards. Writes <out>/peers.json and <out>/peers.md and prints the table.

Run through bench/peers.sh, which installs the peers; `--only infermesh` needs nothing
but the binaries (the test suite's smoke runs it that way)."""
import argparse
import csv
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import peers_report  # noqa: E402

ROOT = h.ROOT
MLP = ROOT / "models/mlp/1/model.onnx"
CORES = os.cpu_count() or 1
VALUES = [(i % 97) / 97.0 for i in range(784)]  # `infermesh bench`'s own default pattern
INFERMESH = ("ort", "worker", "gateway1", "gateway2")
ALL = INFERMESH + ("nginx", "fastapi", "kserve")
BASELINE = {"gateway1": "gateway1-baseline", "gateway2": "gateway2-baseline"}


class Ctx:
    def __init__(self, args, work: pathlib.Path):
        self.args, self.work = args, work
        self.bin = pathlib.Path(args.bin_dir).resolve()
        self.infermesh = str(self.bin / "infermesh")
        self.repo = work / "models"
        (self.repo / "mlp/1").mkdir(parents=True)
        (self.repo / "mlp/1/model.onnx").symlink_to(MLP)
        # Dynamic batching on, default queue delay: what a user serving this MLP would set.
        (self.repo / "mlp/config.pbtxt").write_text("max_batch_size: 64\ndynamic_batching { }\n")
        self.grpc_input = work / "input.json"
        self.grpc_input.write_text(json.dumps([VALUES]))
        self.http_body = work / "body.json"
        self.http_body.write_text(json.dumps({"inputs": [VALUES]}))
        self.pa_data = work / "pa.json"
        self.pa_data.write_text(json.dumps({"data": [{"input": VALUES}]}))

    def grpc_ready(self, url: str) -> bool:
        out, _, _ = h.run_measured([self.infermesh, "bench", "--url", url, "--model", "mlp", "--input",
                                    f"input=@{self.grpc_input}", "--concurrency", "1", "--requests", "5",
                                    "--json"], 30)
        return json.loads(out)["ok"] == 5

    def worker(self, procs, name: str, threads: int) -> str:
        port = h.free_port()
        procs.start(name, [str(self.bin / "infermesh-worker"), "--model-repository", str(self.repo),
                           "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--health-port", "0", "--allow-metrics", "false",
                           "--intra-op-threads", str(threads), "--shutdown-grace", "0s"])
        url = f"127.0.0.1:{port}"
        h.wait_until(lambda: self.grpc_ready(url), name, procs)
        return url

    def gateway(self, procs, workers: list[str], bin_dir=None) -> str:
        port = h.free_port()
        gateway = pathlib.Path(bin_dir or self.bin) / "infermesh-gateway"
        procs.start("gateway", [str(gateway), "--workers", ",".join(workers),
                                "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--health-port", "0",
                                "--allow-metrics", "false", "--shutdown-grace", "0s", "--threads", "1"])
        url = f"127.0.0.1:{port}"
        h.wait_until(lambda: self.grpc_ready(url), "gateway", procs)
        return url


def pids(procs, name: str) -> list[int]:
    return h.descendants(next(p for n, p in procs.started if n == name).pid)


# Each setup starts its servers and returns (url, roles: {process name: [pids]}).
def setup_worker(ctx, procs):
    url = ctx.worker(procs, "worker", 0)
    return url, {"worker": pids(procs, "worker")}


def setup_gateway1(ctx, procs, bin_dir=None):
    w = ctx.worker(procs, "worker", 0)
    return ctx.gateway(procs, [w], bin_dir), {"gateway": pids(procs, "gateway"), "worker": pids(procs, "worker")}


def _two_workers(ctx, procs):
    # Two processes share the cores: one ONNX Runtime thread each keeps the budget at CORES.
    t = max(1, CORES // 2)
    return [ctx.worker(procs, f"worker{i}", t) for i in (1, 2)]


def setup_gateway2(ctx, procs, bin_dir=None):
    ws = _two_workers(ctx, procs)
    return ctx.gateway(procs, ws, bin_dir), {"gateway": pids(procs, "gateway"),
                                             "workers": pids(procs, "worker1") + pids(procs, "worker2")}


def baseline(setup):
    """The same setup with the gateway binary of --baseline-bin-dir (an older build), so a
    change to the gateway is measured against what it replaces in the same run."""
    return lambda ctx, procs: setup(ctx, procs, ctx.args.baseline_bin_dir)


def setup_nginx(ctx, procs):
    ws = _two_workers(ctx, procs)
    port, d = h.free_port(), ctx.work / "nginx"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(peers_report.nginx_conf(d, port, ws))
    subprocess.run(["nginx", "-t", "-q", "-c", str(conf), "-p", str(d)], check=True)
    procs.start("nginx", ["nginx", "-c", str(conf), "-p", str(d), "-g", "daemon off;"])
    url = f"127.0.0.1:{port}"
    h.wait_until(lambda: ctx.grpc_ready(url), "nginx", procs)
    return url, {"nginx": pids(procs, "nginx"), "workers": pids(procs, "worker1") + pids(procs, "worker2")}


def setup_fastapi(ctx, procs):
    port = h.free_port()
    env = {**os.environ, "PEER_MODEL": str(MLP), "PEER_INTRA_OP_THREADS": "1"}
    procs.start("uvicorn", [ctx.args.peers_python, "-m", "uvicorn", "fastapi_app:app", "--app-dir",
                            str(ROOT / "bench/peer_apps"), "--host", "127.0.0.1", "--port", str(port),
                            "--workers", str(CORES), "--no-access-log", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}/predict"
    # Every worker process must be up, not just the first to answer: count them too.
    h.wait_until(lambda: urllib.request.urlopen(url.replace("predict", "health"), timeout=2).status == 200
                 and sum("multiprocessing.spawn" in h.cmdline(p) for p in pids(procs, "uvicorn")) >= CORES,
                 "uvicorn", procs)
    return url, {"uvicorn": pids(procs, "uvicorn")}


def setup_kserve(ctx, procs):
    port = h.free_port()
    env = {**os.environ, "PEER_MODEL": str(MLP), "PEER_INTRA_OP_THREADS": "0"}
    procs.start("kserve", [ctx.args.peers_python, str(ROOT / "bench/peer_apps/kserve_server.py"),
                           "--grpc_port", str(port), "--http_port", str(h.free_port()),
                           "--configure_logging", "false", "--enable_latency_logging", "false"], env=env)
    url = f"127.0.0.1:{port}"
    h.wait_until(lambda: ctx.grpc_ready(url), "kserve", procs)
    return url, {"kserve": pids(procs, "kserve")}


SETUPS = {  # key: (table label, modes, start)
    "worker": ("infermesh worker direct", ("unary", "stream"), setup_worker),
    "gateway1": ("infermesh gateway + 1 worker", ("unary", "stream"), setup_gateway1),
    "gateway2": ("infermesh gateway + 2 workers", ("unary", "stream"), setup_gateway2),
    "gateway1-baseline": ("baseline gateway + 1 worker", ("unary", "stream"), baseline(setup_gateway1)),
    "gateway2-baseline": ("baseline gateway + 2 workers", ("unary", "stream"), baseline(setup_gateway2)),
    "nginx": ("nginx grpc_pass + 2 workers", ("unary", "stream"), setup_nginx),
    "fastapi": ("FastAPI + uvicorn + ONNX Runtime", ("HTTP/JSON",), setup_fastapi),
    "kserve": ("KServe Python server", ("unary",), setup_kserve),
}


def answer(ctx, url: str, http: bool) -> list[float]:
    """One request's output, to check that every setup computes the same thing."""
    if http:
        req = urllib.request.Request(url, data=ctx.http_body.read_bytes(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["outputs"][0]
    out, _, _ = h.run_measured([ctx.infermesh, "infer", "--url", url, "--model", "mlp", "--input",
                                f"input=@{ctx.grpc_input}", "--json"], 30)
    return json.loads(out)["output"][0]


def measure(ctx, url, roles, mode, c) -> dict:
    s = ctx.args.seconds
    meter = h.Meter(roles)
    if mode == "HTTP/JSON":
        r = h.http_load(url, c, s, ctx.http_body)
    else:
        r = h.grpc_load(ctx.infermesh, url, "mlp", c, mode == "stream", s, f"input=@{ctx.grpc_input}")
    r["server"] = meter.done(r["ok"])
    return r


def perf_analyzer(ctx, url, c) -> dict:
    """The same row under Triton's perf_analyzer (count windows, strict stability)."""
    csv_path = ctx.work / "pa.csv"
    n = max(200, int(500 * ctx.args.seconds))
    cmd = [str(ROOT / "scripts/perf-analyzer.sh"), "-m", "mlp", "-u", url, "-i", "grpc", "--input-data",
           str(ctx.pa_data), "--measurement-mode", "count_windows", "--measurement-request-count", str(n),
           "-s", "25", "--max-trials", "10", "--concurrency-range", str(c), "-f", str(csv_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": (out.stdout + out.stderr)[-1500:]}
    row = next(csv.DictReader(csv_path.open()))
    return {"rps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000}


def run_engine(ctx) -> list[dict]:
    """ONNX Runtime alone, one process per batch size so each gets its own CPU and RSS."""
    rows = []
    for b in ctx.args.engine_batches:
        out, cpu, rss = h.run_measured([ctx.infermesh, "bench", "engine", "--model", str(MLP), "--batch-sizes",
                                        str(b), "--seconds", str(ctx.args.seconds), "--json"],
                                       ctx.args.seconds * 3 + 60)
        r = json.loads(out.splitlines()[-1])
        r["cpu_s_per_1k"] = cpu * 1000 / (r["samples_per_s"] * ctx.args.seconds)
        r["hwm_mb"] = rss
        rows.append(r)
        print(f"ONNX Runtime batch {b}: {r['samples_per_s']:.0f} samples/s", file=sys.stderr)
    return rows


def start_setup(ctx, key: str, result: dict, procs) -> tuple:
    """Starts a setup's servers, checks its answer against the first setup's and warms it."""
    label, modes, start = SETUPS[key]
    http = modes == ("HTTP/JSON",)
    url, roles = start(ctx, procs)
    y = answer(ctx, url, http)
    ref = result["answers"].setdefault("reference", y)
    result["answers"][key] = diff = max(abs(a - b) for a, b in zip(y, ref))
    if len(y) != len(ref) or diff > 1e-3:
        raise RuntimeError(f"answers {y}, not {ref} like the first setup")
    warm = min(1.0, ctx.args.seconds)  # first requests (allocations, connections) unmeasured
    (h.http_load(url, 8, warm, ctx.http_body) if http else
     h.grpc_load(ctx.infermesh, url, "mlp", 8, False, warm, f"input=@{ctx.grpc_input}"))
    return url, roles


def row(ctx, key: str, url, roles, procs, mode: str, c: int, result: dict) -> None:
    label = SETUPS[key][0]
    r = measure(ctx, url, roles, mode, c)
    procs.check_alive()
    result["rows"].append({"key": key, "setup": label, "mode": mode, "concurrency": c, **r})
    print(f"{label} {mode} c={c}: {r['rps']:.0f}/s p50 {r['p50_ms']:.2f} ms, {r['errors']} errors", file=sys.stderr)


def levels(ctx, key: str) -> list[int]:
    return ctx.args.concurrency + (ctx.args.gateway_concurrency if key.startswith("gateway") else [])


def run_setup(ctx, key: str, result: dict) -> None:
    label, modes, _ = SETUPS[key]
    procs = h.Procs(ctx.work)
    try:
        url, roles = start_setup(ctx, key, result, procs)
        for mode in modes:
            for c in levels(ctx, key):
                row(ctx, key, url, roles, procs, mode, c, result)
        if key == "worker" and not ctx.args.no_perf_analyzer:
            c = 8 if 8 in ctx.args.concurrency else ctx.args.concurrency[0]
            own = next(r for r in result["rows"] if r["key"] == key and r["mode"] == "unary" and r["concurrency"] == c)
            result["crosscheck"].append({"setup": label, "mode": "unary", "concurrency": c,
                                         "infermesh_bench": {k: own[k] for k in ("rps", "p50_ms", "p99_ms")},
                                         "perf_analyzer": perf_analyzer(ctx, url, c)})
    except Exception as e:  # noqa: BLE001 - one broken peer must not lose the others' rows
        result["failed"][key] = f"{type(e).__name__}: {e}"
        print(f"{label}: FAILED: {e}", file=sys.stderr)
    finally:
        procs.stop()


def run_pair(ctx, key: str, result: dict) -> None:
    """A gateway setup and its baseline build side by side: both running at once, each row
    measured on one then the other, the first alternating from row to row, so drift on
    the machine lands on both builds alike."""
    base = BASELINE[key]
    (ctx.work / "baseline").mkdir(exist_ok=True)
    procs = {key: h.Procs(ctx.work), base: h.Procs(ctx.work / "baseline")}
    try:
        started = {k: start_setup(ctx, k, result, procs[k]) for k in (key, base)}
        n = 0
        for mode in SETUPS[key][1]:
            for c in levels(ctx, key):
                for k in ((key, base) if n % 2 == 0 else (base, key)):
                    row(ctx, k, *started[k], procs[k], mode, c, result)
                n += 1
    except Exception as e:  # noqa: BLE001 - one broken pair must not lose the others' rows
        result["failed"][key] = f"{type(e).__name__}: {e}"
        print(f"{SETUPS[key][0]}: FAILED: {e}", file=sys.stderr)
    finally:
        for p in procs.values():
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "10")),
                    help="per row (env BENCH_SECONDS, default 10)")
    ap.add_argument("--concurrency", default="1,8,32", help="for every setup")
    ap.add_argument("--gateway-concurrency", default="128", help="extra levels for the gateway setups")
    ap.add_argument("--engine-batches", default="1,8,16,32,64")
    ap.add_argument("--only", default=",".join(ALL), help=f"setups: {','.join(ALL)} or 'infermesh'")
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--baseline-bin-dir", help="an older build's binaries: adds the gateway-*-baseline setups")
    ap.add_argument("--peers-python", default=str(ROOT / ".cache/bench-peers/venv/bin/python"))
    ap.add_argument("--no-perf-analyzer", action="store_true", help="skip the perf_analyzer cross-check")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.concurrency, args.gateway_concurrency = ints(args.concurrency), ints(args.gateway_concurrency)
    args.engine_batches = ints(args.engine_batches)
    only = set(INFERMESH if args.only == "infermesh" else args.only.split(","))
    if only - set(ALL):
        ap.error(f"unknown setups {sorted(only - set(ALL))}; known: {','.join(ALL)}")
    if args.baseline_bin_dir:  # each gateway setup again with the older gateway
        only |= {BASELINE[k] for k in only if k in BASELINE}
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops its servers.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(128 + 15))

    work = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-peers-"))
    clean = False
    try:
        ctx = Ctx(args, work)
        result = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "cores": CORES,
                  "seconds_per_row": args.seconds, "engine": [], "rows": [], "crosscheck": [], "answers": {},
                  "failed": {}}
        if "ort" in only:
            try:
                result["engine"] = run_engine(ctx)
            except Exception as e:  # noqa: BLE001 - the servers' rows still mean something
                result["failed"]["ort"] = f"{type(e).__name__}: {e}"
        for key in SETUPS:
            if key not in only or key in BASELINE.values():
                continue  # a baseline runs beside its own setup (run_pair)
            if key in BASELINE and BASELINE[key] in only:
                run_pair(ctx, key, result)
            else:
                run_setup(ctx, key, result)
        result["config"] = peers_report.config(ctx, only, CORES)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        md = peers_report.markdown(result)
        (out / "peers.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "peers.md").write_text(md)
        print(md)
        clean = not result["failed"]
    finally:
        if clean:
            shutil.rmtree(work)
        else:
            print(f"servers' logs kept in {work}", file=sys.stderr)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
