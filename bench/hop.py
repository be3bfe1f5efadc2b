"""The gateway hop beside nginx's, in one run: each setup is a worker of its own with a
proxy in front — nginx `grpc_pass` (upstream keepalive; it pins a stream to one worker and
parses nothing), the gateway, the gateway built from --baseline-bin-dir, and the gateway
with TLS on both hops and with an API key — plus the worker alone. The benchmark MLP,
batch 1, `infermesh bench`: unary at concurrency 1 and 32, and one stream with 32 in
flight; the best req/s of interleaved rounds, the proxy's CPU per request, the p50 the
proxy adds at concurrency 1 (median over rounds of its p50 minus the worker's alone in the
same round), and each gateway's RSS with 1,000 open streams. Default flags everywhere.
Release builds; run through bench/hop.sh."""
import argparse
import asyncio
import hashlib
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
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))

import peers_report  # noqa: E402
from gateway import cpu_seconds, free_port, open_streams, rss_mb  # noqa: E402
from pki import Ca  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "bench-api-key-0123456789abcdef"
MODES = (("unary", 1), ("unary", 32), ("stream", 32))


def repo() -> pathlib.Path:
    d = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-hop-bench-"))
    for name, config in (("mlp", "max_batch_size: 64\ndynamic_batching { }\n"),
                         ("echo", 'backend: "identity"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                                  'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')):
        (d / name / "1").mkdir(parents=True)
        (d / name / "config.pbtxt").write_text(config)
    (d / "mlp" / "1" / "model.onnx").symlink_to(ROOT / "models/mlp/1/model.onnx")
    return d


def healthy(cli: pathlib.Path, port: int) -> None:
    """Waits (bounded) until the plaintext health port says SERVING."""
    deadline = time.monotonic() + 60
    while subprocess.run([str(cli), "health", "--url", f"127.0.0.1:{port}"], capture_output=True).returncode:
        assert time.monotonic() < deadline, f"127.0.0.1:{port} never became healthy"
        time.sleep(0.1)


class Fleet:
    def __init__(self, d: pathlib.Path, cli: pathlib.Path):
        self.d, self.cli, self.procs = d, cli, []

    def start(self, cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def worker(self, bins, flags=()):
        port, health = free_port(), free_port()
        self.start([str(bins / "infermesh-worker"), "--model-repository", str(self.d), "--grpc-address", "127.0.0.1",
                    "--grpc-port", str(port), "--health-address", "127.0.0.1", "--health-port", str(health),
                    "--allow-metrics", "false", "--shutdown-grace", "0s", *flags])
        healthy(self.cli, health)
        return port

    def gateway(self, bins, worker_port, flags=()):
        port, health = free_port(), free_port()
        p = self.start([str(bins / "infermesh-gateway"), "--workers", f"127.0.0.1:{worker_port}",
                        "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--health-address", "127.0.0.1",
                        "--health-port", str(health), "--allow-metrics", "false", "--shutdown-grace", "0s", *flags])
        healthy(self.cli, health)
        return port, [p.pid]

    def nginx(self, worker_port):
        port, d = free_port(), self.d / "nginx"
        (d / "logs").mkdir(parents=True)
        conf = d / "nginx.conf"
        conf.write_text(peers_report.nginx_conf(d, port, [f"127.0.0.1:{worker_port}"]))
        subprocess.run(["nginx", "-t", "-q", "-c", str(conf), "-p", str(d)], check=True)
        p = self.start(["nginx", "-c", str(conf), "-p", str(d), "-g", "daemon off;"])
        time.sleep(0.5)
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        return port, [p.pid] + [int(k) for k in kids]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


def bench(cli, url, mode, c, seconds, flags, pids):
    cmd = [str(cli), "bench", "--url", url, "--model", "mlp", "--concurrency", str(c), "--duration",
           f"{seconds:g}s", "--json", *flags] + (["--streaming"] if mode == "stream" else [])
    before = cpu_seconds(pids) if pids else 0
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    r["cpu_us"] = (cpu_seconds(pids) - before) / r["ok"] * 1e6 if pids and r["ok"] else None
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--baseline-bin-dir", help="an older build: adds 'gateway, before'")
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "5")))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    ap.add_argument("--no-variants", action="store_true", help="skip the TLS and auth setups")
    ap.add_argument("--no-nginx", action="store_true", help="skip nginx (a smoke run without it installed)")
    ap.add_argument("--streams", type=int, default=1000, help="open streams for the RSS reading")
    args = ap.parse_args()
    bins = pathlib.Path(args.bin_dir)
    d = repo()
    ca = Ca(d, "ca")
    s_cert, s_key = (str(p) for p in ca.leaf("server", ["localhost", "127.0.0.1"], 1))
    serve_tls = ["--grpc-server-cert", s_cert, "--grpc-server-key", s_key]
    (d / "auth.yaml").write_text(f"""tenants:
  - name: bench
    keys: ["sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"]
    scopes: [infer, read]
    models: ["*"]
    limits: {{}}
""")
    fleet = Fleet(d, bins / "infermesh")
    setups = {}  # name: (url, client flags, proxy pids)
    try:
        setups["worker alone"] = (f"127.0.0.1:{fleet.worker(bins)}", [], [])
        if not args.no_nginx:
            port, pids = fleet.nginx(fleet.worker(bins))
            setups["nginx grpc_pass"] = (f"127.0.0.1:{port}", [], pids)
        port, pids = fleet.gateway(bins, fleet.worker(bins))
        setups["gateway"] = (f"127.0.0.1:{port}", [], pids)
        if args.baseline_bin_dir:
            old = pathlib.Path(args.baseline_bin_dir)
            port, pids = fleet.gateway(old, fleet.worker(old))
            setups["gateway, before"] = (f"127.0.0.1:{port}", [], pids)
        if not args.no_variants:
            worker = fleet.worker(bins, serve_tls)
            port, pids = fleet.gateway(bins, worker, serve_tls + [
                "--worker-tls-ca", str(ca.cert), "--worker-tls-server-name", "localhost"])
            setups["gateway, TLS both hops"] = (f"https://localhost:{port}", ["--ca", str(ca.cert)], pids)
            port, pids = fleet.gateway(bins, fleet.worker(bins), ["--auth-config", str(d / "auth.yaml")])
            setups["gateway, API key"] = (f"127.0.0.1:{port}", ["--token", KEY], pids)
        cli = bins / "infermesh"
        best, p50s = {}, {name: [] for name in setups}
        names = list(setups)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for mode, c in MODES:
                for name in order:
                    url, flags, pids = setups[name]
                    got = bench(cli, url, mode, c, args.seconds, flags, pids)
                    print(f"round {r + 1} {name} {mode} c={c}: {got['requests_per_s']:.0f}/s", file=sys.stderr)
                    if (mode, c) == ("unary", 1):
                        p50s[name].append(got["p50_ms"] * 1000)
                    key = (name, mode, c)
                    if key not in best or got["requests_per_s"] > best[key]["requests_per_s"]:
                        best[key] = got
        rss = {}
        # Plaintext and no credentials: the streams are the helper's (tritonclient's stubs).
        for name in [n for n in ("gateway", "gateway, before") if n in setups]:
            url, _, pids = setups[name]
            loop = asyncio.new_event_loop()
            idle = rss_mb(pids[0])
            channels, queues, _ = loop.run_until_complete(open_streams(url, args.streams))
            rss[name] = (idle, rss_mb(pids[0]))
            for q in queues:
                q.put_nowait(None)
            for ch in channels:
                loop.run_until_complete(ch.close())
    finally:
        fleet.stop()
    report(args, setups, best, p50s, rss)


def report(args, setups, best, p50s, rss):
    print(f"`{shlex.join(['bench/hop.sh', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; MLP, batch 1; "
          f"best req/s of {args.rounds} interleaved rounds of {args.seconds:g} s; proxy CPU in µs per request)\n")
    proxies = [n for n in setups if n != "worker alone"]
    print("| setup | mode | concurrency | req/s | p50 ms | proxy CPU µs / req | CPU vs nginx |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, c in MODES:
        ngx = best.get(("nginx grpc_pass", mode, c), {}).get("cpu_us")
        for name in setups:
            r = best[(name, mode, c)]
            cpu = "" if r["cpu_us"] is None else f"{r['cpu_us']:.1f}"
            vs = "" if r["cpu_us"] is None or not ngx else f"{r['cpu_us'] / ngx:.2f}×"
            print(f"| {name} | {mode} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.3f} | {cpu} | {vs} |")
    print("\nAdded p50 at concurrency 1 (unary; each round's p50 minus the worker's alone, same round):\n")
    print("| setup | added µs per round | median |")
    print("|---|---|---:|")
    for name in proxies:
        added = [a - b for a, b in zip(p50s[name], p50s["worker alone"])]
        print(f"| {name} | {', '.join(f'{x:.0f}' for x in added)} | {statistics.median(added):.0f} |")
    if rss:
        print(f"\n| gateway | RSS idle MB | RSS with {args.streams:,} open streams MB |")
        print("|---|---:|---:|")
        for name, (idle, held) in rss.items():
            print(f"| {name} | {idle:.1f} | {held:.1f} |")


if __name__ == "__main__":
    main()
