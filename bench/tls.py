"""What TLS costs on the gateway hop, side by side in one run: client → gateway → worker
in plaintext, with TLS on both hops, and with mTLS on both hops (the production shape).
Identity model (no model cost, so the TLS work is what differs), `infermesh bench` unary at
concurrency 1 and 32 over one connection; req/s, p50, and CPU per 1,000 requests of the
gateway and of the worker. Certificates are made here (ECDSA P-256, as cert-manager's in
deploy/overlays/production-tls). Release builds; run through bench/tls.sh."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))

from gateway import BIN, SECONDS, cpu_seconds, free_port  # noqa: E402
from pki import Ca  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


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
    """A temporary model repository holding the identity model `echo` (no model cost)."""
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


def main() -> None:
    d = echo_repo("infermesh-tls-bench-")
    ca = Ca(d, "ca")
    s_cert, s_key = (str(p) for p in ca.leaf("server", ["localhost", "127.0.0.1"], 1))
    g_cert, g_key = (str(p) for p in ca.leaf("gateway", ["gateway.infermesh.test"], 2))
    c_cert, c_key = (str(p) for p in ca.leaf("client", ["client.infermesh.test"], 3))
    serve = ["--grpc-server-cert", s_cert, "--grpc-server-key", s_key]
    mutual = ["--grpc-use-ssl-mutual", "--grpc-root-cert", str(ca.cert)]
    setups = {
        "plaintext": ([], [], []),
        "TLS both hops": (serve, serve + ["--worker-tls-ca", str(ca.cert)], ["--ca", str(ca.cert)]),
        "mTLS both hops": (
            serve + mutual + ["--grpc-allowed-client-names", "gateway.infermesh.test"],
            serve + mutual + ["--worker-tls-ca", str(ca.cert), "--worker-tls-cert", g_cert, "--worker-tls-key", g_key],
            ["--ca", str(ca.cert), "--cert", c_cert, "--key", c_key],
        ),
    }
    procs, running = [], {}

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        for name, (worker_flags, gateway_flags, client_flags) in setups.items():
            wport, whealth, gport, ghealth = free_port(), free_port(), free_port(), free_port()
            w = start([str(BIN / "infermesh-worker"), "--model-repository", str(d), "--grpc-address", "127.0.0.1",
                       "--grpc-port", str(wport), "--health-address", "127.0.0.1", "--health-port", str(whealth),
                       "--allow-metrics", "false", "--intra-op-threads", "1", "--threads", "1",
                       "--shutdown-grace", "0s", *worker_flags])
            healthy(whealth)
            # The workers' certificate is for localhost; they are dialled by IP.
            name_flags = ["--worker-tls-server-name", "localhost"] if gateway_flags else []
            g = start([str(BIN / "infermesh-gateway"), "--workers", f"127.0.0.1:{wport}", "--grpc-address",
                       "127.0.0.1", "--grpc-port", str(gport), "--health-address", "127.0.0.1", "--health-port",
                       str(ghealth), "--allow-metrics", "false", "--threads", "1", "--shutdown-grace", "0s",
                       *name_flags, *gateway_flags])
            healthy(ghealth)
            scheme = "https://localhost" if client_flags else "127.0.0.1"
            running[name] = (f"{scheme}:{gport}", client_flags, [g.pid, w.pid])
        results = best_of(running, ROUNDS)
        print(f"Identity model, `infermesh bench` unary over one connection, {SECONDS:g} s per run, best of "
              f"{ROUNDS} interleaved rounds; CPU in ms per 1,000 requests.\n")
        print("| hops | concurrency | req/s | vs plaintext | p50 ms | gateway CPU | vs plaintext | worker CPU |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in (1, 32):
            base = results[("plaintext", c)]
            for name in setups:
                r = results[(name, c)]
                gw, wk = r["cpu_ms_per_1k"]
                print(f"| {name} | {c} | {r['requests_per_s']:.0f} | {r['requests_per_s'] / base['requests_per_s']:.2f}× | "
                      f"{r['p50_ms']:.3f} | {gw:.0f} | {gw / base['cpu_ms_per_1k'][0]:.2f}× | {wk:.0f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
