"""The HTTP/REST door beside gRPC and beside FastAPI, in one run, on the MLP at batch 1: the
worker direct and the gateway + 1 worker, each through gRPC (h2load, one connection, the
concurrency as streams), HTTP/JSON and HTTP with Triton's binary tensor data (wrk, one
thread, HTTP/1.1 keep-alive), and FastAPI + uvicorn + ONNX Runtime on the same JSON values
(wrk). C load generators on every side. Prints requests/s, p50/p99, the servers' CPU per
request and each row's throughput against FastAPI's at the same concurrency.

Run through bench/rest.sh (installs the FastAPI peer); --no-fastapi needs only the binaries
(wrk and h2load come from scripts/loadgen.sh)."""
import argparse
import json
import os
import pathlib
import shlex
import struct
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as h  # noqa: E402

ROOT = h.ROOT
MLP = ROOT / "models/mlp/1/model.onnx"
CORES = os.cpu_count() or 1
VALUES = [(i % 97) / 97.0 for i in range(784)]
DOORS = ("gRPC", "HTTP/JSON", "HTTP/binary")


def bodies(work: pathlib.Path) -> dict:
    """The same input as a gRPC message (framed), a KServe v2 JSON body, a binary-data body
    and FastAPI's JSON body."""
    from tritonclient.grpc import service_pb2
    raw = struct.pack("<784f", *VALUES)
    req = service_pb2.ModelInferRequest(model_name="mlp", raw_input_contents=[raw])
    req.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    msg = req.SerializeToString()
    out = {"grpc": work / "grpc.bin", "json": work / "v2.json", "binary": work / "v2.bin", "fastapi": work / "fa.json"}
    out["grpc"].write_bytes(b"\0" + struct.pack(">I", len(msg)) + msg)
    out["json"].write_text(json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                                   "data": VALUES}]}))
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    out["binary"].write_bytes(header + raw)
    out["header_len"] = len(header)
    out["fastapi"].write_text(json.dumps({"inputs": [VALUES]}))
    return out


def grpc_load(url: str, concurrency: int, seconds: float, body: pathlib.Path, work: pathlib.Path) -> dict:
    """h2load on one connection with `concurrency` streams; percentiles from its per-request log."""
    log = work / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to it
    cmd = [str(ROOT / "scripts/loadgen.sh"), "h2load", "-c", "1", "-m", str(concurrency), "-D", str(max(1, round(seconds))),
           "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
           "--log-file", str(log), f"http://{url}/inference.GRPCInferenceService/ModelInfer"]
    out, cpu, _ = h.run_measured(cmd, seconds + 60)
    lines = [x.split("\t") for x in log.read_text().splitlines() if x.strip()]
    ok = [int(x[2]) for x in lines if x[1] == "200"]
    failed = len(lines) - len(ok)
    ok.sort()
    secs = float(next(x for x in out.splitlines() if x.startswith("finished in")).split()[2].rstrip("s,"))
    pct = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] / 1000) if ok else (lambda q: 0.0)
    return {"ok": len(ok), "errors": failed, "seconds": secs, "rps": len(ok) / secs, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "client_cpu_s": cpu}


def start_worker(bin_dir, procs, repo, extra=()) -> tuple[str, str]:
    port, http = h.free_port(), h.free_port()
    procs.start("worker", [str(bin_dir / "infermesh-worker"), "--model-repository", str(repo),
                           "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(http),
                           "--health-port", "0", "--allow-metrics", "false", "--shutdown-grace", "0s", *extra])
    return f"127.0.0.1:{port}", f"127.0.0.1:{http}"


def start_gateway(bin_dir, procs, worker) -> tuple[str, str]:
    port, http = h.free_port(), h.free_port()
    procs.start("gateway", [str(bin_dir / "infermesh-gateway"), "--workers", worker, "--grpc-address", "127.0.0.1",
                            "--grpc-port", str(port), "--http-port", str(http), "--health-port", "0",
                            "--allow-metrics", "false", "--shutdown-grace", "0s"])
    return f"127.0.0.1:{port}", f"127.0.0.1:{http}"


def ready(http: str) -> bool:
    with urllib.request.urlopen(f"http://{http}/v2/models/mlp/ready", timeout=2) as r:
        return r.status == 200


def answer(http: str, body: pathlib.Path) -> list[float]:
    req = urllib.request.Request(f"http://{http}/v2/models/mlp/infer", data=body.read_bytes())
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["outputs"][0]["data"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "5")))
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--peers-python", default=None, help="the python with fastapi and uvicorn (bench/rest.sh sets it)")
    ap.add_argument("--no-fastapi", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    bin_dir = pathlib.Path(args.bin_dir).resolve()
    work = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-http-bench-"))
    repo = work / "models"
    (repo / "mlp/1").mkdir(parents=True)
    (repo / "mlp/1/model.onnx").symlink_to(MLP)
    (repo / "mlp/config.pbtxt").write_text("max_batch_size: 64\ndynamic_batching { }\n")
    b = bodies(work)
    rows = []
    for setup in ("worker", "gateway"):
        procs = h.Procs(work)
        try:
            grpc, http = start_worker(bin_dir, procs, repo)
            roles = {"worker": h.descendants(procs.started[0][1].pid)}
            h.wait_until(lambda: ready(http), "worker", procs)
            if setup == "gateway":
                grpc, http = start_gateway(bin_dir, procs, grpc)
                roles["gateway"] = h.descendants(procs.started[1][1].pid)
                h.wait_until(lambda: ready(http), "gateway", procs)
            reference = answer(http, b["json"])
            for door in DOORS:
                for c in levels:
                    meter = h.Meter(roles)
                    if door == "gRPC":
                        r = grpc_load(grpc, c, args.seconds, b["grpc"], work)
                    else:
                        body, hl = (b["json"], None) if door == "HTTP/JSON" else (b["binary"], b["header_len"])
                        r = h.http_load(f"http://{http}/v2/models/mlp/infer", c, args.seconds, body, hl)
                    r["server"] = meter.done(r["ok"])
                    rows.append({"setup": f"infermesh {setup}" + (" + 1 worker" if setup == "gateway" else ""),
                                 "door": door, "c": c, **r})
                    print(f"{setup} {door} c={c}: {r['rps']:.0f}/s p50 {r['p50_ms']:.2f} ms, {r['errors']} errors",
                          file=sys.stderr)
        finally:
            procs.stop()
    if not args.no_fastapi:
        rows += fastapi(args, work, b, levels, reference)
    report(args, rows)


def fastapi(args, work, b, levels, reference) -> list[dict]:
    procs = h.Procs(work)
    rows = []
    try:
        port = h.free_port()
        env = {**os.environ, "PEER_MODEL": str(MLP), "PEER_INTRA_OP_THREADS": "1"}
        procs.start("uvicorn", [args.peers_python, "-m", "uvicorn", "fastapi_app:app", "--app-dir",
                                str(ROOT / "bench/peer_apps"), "--host", "127.0.0.1", "--port", str(port),
                                "--workers", str(CORES), "--no-access-log", "--log-level", "warning"], env=env)
        url = f"http://127.0.0.1:{port}/predict"
        pids = lambda: h.descendants(procs.started[0][1].pid)  # noqa: E731
        h.wait_until(lambda: urllib.request.urlopen(url.replace("predict", "health"), timeout=2).status == 200
                     and sum("multiprocessing.spawn" in h.cmdline(p) for p in pids()) >= CORES, "uvicorn", procs)
        req = urllib.request.Request(url, data=b["fastapi"].read_bytes(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            got = json.load(r)["outputs"][0]
        assert max(abs(x - y) for x, y in zip(got, reference)) < 1e-3, (got, reference)
        for c in levels:
            meter = h.Meter({"uvicorn": pids()})
            r = h.http_load(url, c, args.seconds, b["fastapi"])
            r["server"] = meter.done(r["ok"])
            rows.append({"setup": "FastAPI + uvicorn + ONNX Runtime", "door": "HTTP/JSON", "c": c, **r})
            print(f"fastapi c={c}: {r['rps']:.0f}/s", file=sys.stderr)
    finally:
        procs.stop()
    return rows


def report(args, rows) -> None:
    print(f"`{shlex.join(['bench/rest.sh', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; the MLP at batch 1, "
          f"dynamic batching; {CORES} cores shared by servers and clients; {args.seconds:g} s per row; "
          f"gRPC by h2load (1 connection, c streams), HTTP by wrk (1 thread, c connections))\n")
    fa = {r["c"]: r["rps"] for r in rows if r["setup"].startswith("FastAPI")}
    print("| setup | door | c | req/s | p50 ms | p99 ms | server CPU µs / req | vs FastAPI |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = sum(v["cpu_s"] for v in r["server"].values()) / max(r["ok"], 1) * 1e6
        vs = f"{r['rps'] / fa[r['c']]:.1f}×" if r["c"] in fa and fa[r["c"]] else ""
        print(f"| {r['setup']} | {r['door']} | {r['c']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {cpu:.0f} | {vs} |")
    errors = [r for r in rows if r["errors"]]
    if errors:
        print("\nerrors: " + ", ".join(f"{r['setup']} {r['door']} c={r['c']}: {r['errors']}" for r in errors))


if __name__ == "__main__":
    main()
