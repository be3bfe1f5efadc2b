"""Many models on one fleet: a catalog several times larger than the workers' memory for
models, served through two gateways by placement-mode workers, under Zipf traffic
(s = 0.8, 1.0, 1.2) and a cyclic sweep of every model; beside it the same traces on
workers with as many of the most requested models preloaded as fit (the baseline without
placement). One client sends each trace in order, one request at a time, alternating
gateways, so each request is known as a hit or a cold start (the gateway's counter) and
its latency as the client saw it.

Prints per trace: the hit rate, beside Belady's offline optimum and LRU on the same trace
with the fleet's capacity counted in mean-sized models (a uniform-size reference: real
models differ in size, so it is a reference, not a bound); warm p50 (a hit goes straight
to a holder: no extra hop, compare the baseline's p50), cold p50/p99, MiB of model files
loaded per minute, loads and duplicate loads (loads beyond one per cold request, from two
gateways); and the baseline's share of requests served and its p50.

Run through bench/placement.sh (BENCH_BUILD=0 keeps the release binaries as they are)."""
import argparse
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time
import urllib.request

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as h  # noqa: E402

SIZES = (512, 768, 1024)  # k: k×k FP32 weights, 1, 2.25 and 4 MiB
MiB = 1 << 20


def matmul_model(path: pathlib.Path, k: int) -> None:
    import onnx  # noqa: F401 - the test venv has it
    from onnx import TensorProto, helper
    w = np.random.RandomState(k).rand(k, k).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor("w", TensorProto.FLOAT, [k, k], w.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def size(i: int) -> int:
    return SIZES[i % len(SIZES)]


def traces(models: int, requests: int) -> dict[str, list[int]]:
    """Model indices by trace; in the Zipf traces model i is the (i+1)-th most popular."""
    rng = np.random.RandomState(1)
    out = {}
    for s in (0.8, 1.0, 1.2):
        p = 1.0 / np.arange(1, models + 1) ** s
        out[f"zipf s={s}"] = [int(i) for i in rng.choice(models, size=requests, p=p / p.sum())]
    out["cyclic sweep"] = [i % models for i in range(requests)]
    return out


def belady(trace: list[int], slots: int) -> float:
    """Hit rate of the offline optimum with `slots` uniform slots: evict the model used
    farthest in the future."""
    nxt, last = [0] * len(trace), {}
    for t in range(len(trace) - 1, -1, -1):
        nxt[t] = last.get(trace[t], len(trace) + t)
        last[trace[t]] = t
    held, hits = {}, 0
    for t, m in enumerate(trace):
        if m in held:
            hits += 1
        elif len(held) >= slots:
            del held[max(held, key=held.get)]
        held[m] = nxt[t]
    return hits / len(trace)


def lru(trace: list[int], slots: int) -> float:
    held, hits = {}, 0
    for t, m in enumerate(trace):
        if m in held:
            hits += 1
            del held[m]
        elif len(held) >= slots:
            del held[next(iter(held))]
        held[m] = t
    return hits / len(trace)


def metric(url: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + " ") or line.startswith(name + "{")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def listening(procs, name: str, timeout: float = 60) -> tuple[str, str]:
    """The gRPC and metrics addresses a server started on port 0 logged (no port picked
    ahead can be taken by another process in between)."""
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        for line in (procs.logdir / f"{name}.log").read_text(errors="replace").splitlines():
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if "address" in fields and "metrics" in fields:
                return fields["address"], fields["metrics"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not log its addresses:\n{procs.tail(name)}")
        time.sleep(0.05)


# Every server on loopback, on ports it picks (read back with `listening`).
SERVER_FLAGS = ["--grpc-address", "127.0.0.1", "--grpc-port", "0", "--metrics-address", "127.0.0.1",
                "--metrics-port", "0", "--health-port", "0", "--allow-http", "false", "--shutdown-grace", "0s",
                "--log-format", "json"]


def start_fleet(bin_dir, procs, repo, workers, extra_worker, gateways=2):
    """Workers and gateways on loopback; returns (worker (grpc, metrics)), gateway (grpc, metrics))."""
    common = SERVER_FLAGS
    for n in range(workers):
        procs.start(f"worker{n}", [str(bin_dir / "infermesh-worker"), "--model-repository", str(repo), *common,
                                   "--intra-op-threads", "1", *extra_worker])
    ws = [listening(procs, f"worker{n}") for n in range(workers)]
    for n in range(gateways):
        procs.start(f"gateway{n}", [str(bin_dir / "infermesh-gateway"), "--workers", ",".join(w for w, _ in ws),
                                    *common])
    gs = [listening(procs, f"gateway{n}") for n in range(gateways)]
    return ws, gs


def run_trace(gateways, trace, placing: bool):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    clients = [grpcclient.InferenceServerClient(g) for g, _ in gateways]
    inputs = {}
    warm, cold, failed, loaded, by_model = [], [], 0, 0, []
    started = time.monotonic()
    for n, i in enumerate(trace):
        k = size(i)
        if k not in inputs:
            x = grpcclient.InferInput("x", [1, k], "FP32")
            x.set_data_from_numpy(np.ones((1, k), np.float32))
            inputs[k] = x
        g = n % len(clients)
        # Read on both sides, so the baseline pays the same scrape between requests.
        before = metric(gateways[g][1], "infermesh_gateway_placement_requests_total", result="cold")
        t0 = time.perf_counter()
        try:
            clients[g].infer(f"m{i}", [inputs[k]], client_timeout=120)
        except InferenceServerException:
            failed += 1
            continue
        took = (time.perf_counter() - t0) * 1000
        was_cold = placing and metric(gateways[g][1], "infermesh_gateway_placement_requests_total",
                                      result="cold") > before
        (cold if was_cold else warm).append(took)
        if not was_cold:
            by_model.append((i, took))
        if was_cold:
            loaded += 4 * k * k
    minutes = (time.monotonic() - started) / 60
    return {"warm": warm, "cold": cold, "failed": failed, "mib_per_min": loaded / MiB / minutes,
            "warm_by_model": by_model}


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(h.ROOT / "target/release"))
    ap.add_argument("--models", type=int, default=90)
    ap.add_argument("--requests", type=int, default=600, help="requests per trace")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--capacity-mib", type=int, default=24, help="each worker's --model-memory-bytes")
    args = ap.parse_args()
    bin_dir = pathlib.Path(args.bin_dir).resolve()
    work = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-placement-bench-"))
    repo = work / "models"
    for i in range(args.models):
        matmul_model(repo / f"m{i}" / "1" / "model.onnx", size(i))
    files = [4 * size(i) ** 2 for i in range(args.models)]
    rows = []
    for name, trace in traces(args.models, args.requests).items():
        procs = h.Procs(work)
        try:
            ws, gs = start_fleet(bin_dir, procs, repo, args.workers,
                                 ["--model-control-mode", "placement", "--model-memory-bytes",
                                  str(args.capacity_mib * MiB), "--model-min-idle", "0s"])
            for g, _ in gs:
                h.wait_until(lambda g=g: ready(g), "gateway", procs)
            r = run_trace(gs, trace, True)
            r["loads"] = sum(metric(m, "infermesh_model_loads_total", result="ok") for _, m in ws)
            held = [metric(m, "infermesh_model_memory_used_bytes") for _, m in ws]
        finally:
            procs.stop()
        # The fleet's capacity in mean-sized models, as the workers filled it.
        mean = sum(files) / len(files)
        slots = max(1, round(sum(held) / (mean + 1.3 * MiB)))
        r.update(trace=name, belady=belady(trace, slots), lru=lru(trace, slots), slots=slots)
        # The baseline: the most requested models that fit, preloaded on every worker.
        order = sorted(set(trace), key=lambda i: -trace.count(i))
        fit, used = [], 9 * MiB  # ONNX Runtime's own start rides on the first load
        for i in order:
            if used + files[i] + 1.3 * MiB > args.capacity_mib * MiB:
                break
            fit.append(i)
            used += files[i] + 1.3 * MiB
        procs = h.Procs(work)
        try:
            ws, gs = start_fleet(bin_dir, procs, repo, args.workers,
                                 ["--model-control-mode", "explicit", "--allow-empty-repository",
                                  *[a for i in fit for a in ("--load-model", f"m{i}")]])
            for g, _ in gs:
                h.wait_until(lambda g=g: ready(g), "gateway", procs)
            b = run_trace(gs, trace, False)
        finally:
            procs.stop()
        r["baseline_served"] = 1 - b["failed"] / len(trace)
        r["baseline_p50"] = pct(b["warm"], 50)
        r["baseline_models"] = len(fit)
        # Like for like: warm requests for the models the baseline preloaded.
        r["warm_same_p50"] = pct([t for i, t in r["warm_by_model"] if i in fit], 50)
        rows.append(r)
        print(f"{name}: hit rate {len(r['warm']) / len(trace):.2f} (Belady {r['belady']:.2f}), "
              f"{r['failed']} failed", file=sys.stderr)
    report(args, rows, sum(files))


def ready(grpc: str) -> bool:
    import tritonclient.grpc as grpcclient
    return grpcclient.InferenceServerClient(grpc).is_server_ready()


def report(args, rows, catalog_bytes) -> None:
    cores = os.cpu_count() or 1
    print(f"`{shlex.join(['bench/placement.sh', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; {args.models} models "
          f"of 1, 2.25 and 4 MiB ({catalog_bytes / MiB:.0f} MiB of files) on {args.workers} workers with "
          f"--model-memory-bytes {args.capacity_mib} MiB each, two gateways taking turns, one client sending "
          f"{args.requests} requests per trace one at a time; {cores} cores shared by everything; binaries from {args.bin_dir})\n")
    print("| trace | hit rate | Belady (uniform) | LRU (uniform) | slots | warm p50 ms | cold p50 ms | cold p99 ms "
          "| MiB loaded / min | loads | duplicate loads | failed | baseline: models preloaded | baseline served "
          "| warm p50 ms, preloaded models: placement | baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = len(r["warm"]) + len(r["cold"]) + r["failed"]
        dup = int(r["loads"]) - len(r["cold"])
        print(f"| {r['trace']} | {len(r['warm']) / n:.2f} | {r['belady']:.2f} | {r['lru']:.2f} | {r['slots']} "
              f"| {pct(r['warm'], 50):.2f} | {pct(r['cold'], 50):.1f} | {pct(r['cold'], 99):.1f} "
              f"| {r['mib_per_min']:.0f} | {int(r['loads'])} | {max(dup, 0)} | {r['failed']} "
              f"| {r['baseline_models']} | {r['baseline_served']:.2f} | {r['warm_same_p50']:.2f} "
              f"| {r['baseline_p50']:.2f} |")
    failed = [r for r in rows if r["failed"]]
    if failed:
        print("\nerrors: " + ", ".join(f"{r['trace']}: {r['failed']} failed" for r in failed))


if __name__ == "__main__":
    main()
