"""Shared by bench/tls.py and bench/auth.py: client → gateway → worker setups side by
side in one run, each a worker and a gateway of its own on 127.0.0.1, driven by
`infermesh bench` on the identity model (no model cost) at concurrency 1 and 32; the best
of interleaved rounds, printed as one table against the first setup."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from gateway import BIN, SECONDS, cpu_seconds, free_port  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
COMMON = ["--grpc-address", "127.0.0.1", "--health-address", "127.0.0.1", "--allow-metrics", "false",
          "--threads", "1", "--shutdown-grace", "0s"]


def healthy(port: int) -> None:
    """Waits (bounded) until the plaintext health port says SERVING."""
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run([str(BIN / "infermesh"), "health", "--url", f"127.0.0.1:{port}"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            return
        assert time.monotonic() < deadline, out.stderr
        time.sleep(0.1)


def bench(url, c, flags, pids):
    cmd = [str(BIN / "infermesh"), "bench", "--url", url, "--model", "echo", "--concurrency", str(c),
           "--duration", f"{SECONDS}s", "--json", *flags]
    before = [cpu_seconds([p]) for p in pids]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    spent = [cpu_seconds([p]) - b for p, b in zip(pids, before)]
    r["cpu_ms_per_1k"] = [s * 1000 / r["ok"] * 1000 for s in spent] if r["ok"] else [float("nan")] * len(pids)
    return r


def echo_repo(prefix: str) -> pathlib.Path:
    """A temporary model repository holding the identity model `echo`."""
    d = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    (d / "echo" / "1").mkdir(parents=True)
    (d / "echo" / "config.pbtxt").write_text(
        'backend: "identity"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    return d


def best_of(running, rounds):
    """{(setup, concurrency): the best of `rounds` interleaved runs}: the setups share two
    cores with the client, so each gets the same conditions in turn."""
    results = {}
    names = list(running)
    for r in range(rounds):
        # Each round starts with another setup: the first run after a pause pays for
        # waking the cores, and that cost should not land on one setup every time.
        order = names[r % len(names):] + names[:r % len(names)]
        for c in (1, 32):
            for name in order:
                url, flags, pids = running[name]
                got = bench(url, c, flags, pids)
                best = results.get((name, c))
                if best is None or got["requests_per_s"] > best["requests_per_s"]:
                    results[(name, c)] = got
    return results


def compare(repo, setups, first_column, worker_cpu):
    """Runs every setup {name: (worker flags, gateway flags, client flags, host[, bin
    dir])} and prints the table; `host` is what the client dials before ":port" (a URL
    prefix); a bin dir runs that setup's worker and gateway from other binaries (an older
    build beside the new), while the client stays the same for all."""
    procs, running = [], {}

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        for name, (worker_flags, gateway_flags, client_flags, host, *bin_dir) in setups.items():
            bins = pathlib.Path(bin_dir[0]) if bin_dir else BIN
            wport, whealth, gport, ghealth = free_port(), free_port(), free_port(), free_port()
            w = start([str(bins / "infermesh-worker"), "--model-repository", str(repo), "--grpc-port", str(wport),
                       "--health-port", str(whealth), "--intra-op-threads", "1", *COMMON, *worker_flags])
            healthy(whealth)
            g = start([str(bins / "infermesh-gateway"), "--workers", f"127.0.0.1:{wport}", "--grpc-port", str(gport),
                       "--health-port", str(ghealth), *COMMON, *gateway_flags])
            healthy(ghealth)
            running[name] = (f"{host}:{gport}", client_flags, [g.pid, w.pid])
        results = best_of(running, ROUNDS)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    baseline = next(iter(setups))
    print(f"Identity model, `infermesh bench` unary over one connection, {SECONDS:g} s per run, best of "
          f"{ROUNDS} interleaved rounds; CPU in ms per 1,000 requests.\n")
    vs = f"vs {baseline}"
    print(f"| {first_column} | concurrency | req/s | {vs} | p50 ms | gateway CPU | {vs} |"
          + (" worker CPU |" if worker_cpu else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if worker_cpu else ""))
    for c in (1, 32):
        base = results[(baseline, c)]
        for name in setups:
            r = results[(name, c)]
            gw, wk = r["cpu_ms_per_1k"]
            print(f"| {name} | {c} | {r['requests_per_s']:.0f} | {r['requests_per_s'] / base['requests_per_s']:.2f}× | "
                  f"{r['p50_ms']:.3f} | {gw:.0f} | {gw / base['cpu_ms_per_1k'][0]:.2f}× |"
                  + (f" {wk:.0f} |" if worker_cpu else ""))
