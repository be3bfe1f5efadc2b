"""Gateway overhead and balancing, side by side in one run: a worker direct, the gateway
with 1 and 2 workers (and busy polling with 1), nginx grpc_pass (upstream keepalive, as
nginx advises) in front of the same 1 and 2 workers. Identity model (no model cost) and
the MLP; `infermesh bench` unary and one stream; CPU per 1,000 requests of the proxy; the
added p50 at concurrency 1 over interleaved rounds; gateway RSS with 1,000 open streams."""
import asyncio
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"
SECONDS = float(os.environ.get("BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str) -> None:
    import tritonclient.grpc as g

    c = g.InferenceServerClient(url)
    deadline = time.monotonic() + 60
    while True:
        try:
            if c.is_server_ready():
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.1)


def cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench(url, model, c, streaming, pids):
    cmd = [str(BIN / "infermesh"), "bench", "--url", url, "--model", model, "--concurrency", str(c),
           "--duration", f"{SECONDS}s", "--json"] + (["--streaming"] if streaming else [])
    before = cpu_seconds(pids) if pids else 0
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    cpu = (cpu_seconds(pids) - before) if pids else None
    r["cpu_ms_per_1k"] = None if cpu is None or r["ok"] == 0 else cpu * 1000 / r["ok"] * 1000
    return r


async def open_streams(url: str, n: int) -> None:
    """Opens n ModelStreamInfer streams (over 10 connections), one request answered on
    each, all kept open while the caller reads RSS."""
    import grpc
    import tritonclient.grpc.service_pb2 as pb
    import tritonclient.grpc.service_pb2_grpc as pbg

    channels = [grpc.aio.insecure_channel(url) for _ in range(10)]
    req = pb.ModelInferRequest(model_name="echo")
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    req.raw_input_contents.append(b"\0" * 16)
    queues, calls = [], []
    for i in range(n):
        q = asyncio.Queue()
        await q.put(req)

        async def gen(q=q):
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item

        call = pbg.GRPCInferenceServiceStub(channels[i % 10]).ModelStreamInfer(gen())
        queues.append(q)
        calls.append(call)
    for call in calls:
        await call.read()
    return channels, queues, calls


def main() -> None:
    d = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-gw-bench-"))
    (d / "echo" / "1").mkdir(parents=True)
    (d / "echo" / "config.pbtxt").write_text(
        'backend: "identity"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    (d / "mlp" / "1").mkdir(parents=True)
    (d / "mlp" / "1" / "model.onnx").symlink_to(ROOT / "models/mlp/1/model.onnx")
    (d / "mlp" / "config.pbtxt").write_text("max_batch_size: 64\ndynamic_batching { }\n")
    procs = []

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        workers = []
        for _ in range(2):
            port = free_port()
            start([str(BIN / "infermesh-worker"), "--model-repository", str(d), "--grpc-address", "127.0.0.1",
                   "--grpc-port", str(port), "--health-port", "0", "--allow-metrics", "false", "--intra-op-threads", "1",
                   "--shutdown-grace", "0s"])
            workers.append(f"127.0.0.1:{port}")
        for w in workers:
            wait_ready(w)
        gws = {}
        # 1 and 2 workers; "busy" = 1 worker with --busy-poll-us 100 (README "Busy polling").
        for n, extra in ((1, []), (2, []), ("busy", ["--busy-poll-us", "100"])):
            port = free_port()
            p = start([str(BIN / "infermesh-gateway"), "--workers", ",".join(workers[:1 if n == "busy" else n]),
                       "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--health-port", "0", "--allow-metrics", "false",
                       "--shutdown-grace", "0s", "--threads", "1", *extra])
            gws[n] = (f"127.0.0.1:{port}", p.pid)
            wait_ready(gws[n][0])
        nginx_port, nginx1_port = free_port(), free_port()
        ngx = d / "nginx"
        (ngx / "logs").mkdir(parents=True)
        conf = ngx / "nginx.conf"
        conf.write_text(f"""
worker_processes auto;
pid {ngx}/nginx.pid;
error_log {ngx}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  # A gRPC stream is one request body: the 1m default cuts long streams with INTERNAL.
  client_max_body_size 0;
  client_body_temp_path {ngx}/body; proxy_temp_path {ngx}/proxy;
  fastcgi_temp_path {ngx}/fcgi; uwsgi_temp_path {ngx}/uwsgi; scgi_temp_path {ngx}/scgi;
  upstream workers {{ {' '.join(f'server {w};' for w in workers)} keepalive 64; }}
  upstream one {{ server {workers[0]}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{nginx_port} http2;
    location / {{ grpc_pass grpc://workers; }}
  }}
  server {{
    listen 127.0.0.1:{nginx1_port} http2;
    location / {{ grpc_pass grpc://one; }}
  }}
}}
""")
        subprocess.run(["nginx", "-t", "-q", "-c", str(conf), "-p", str(ngx)], check=True)
        nginx = start(["nginx", "-c", str(conf), "-p", str(ngx), "-g", "daemon off;"])
        time.sleep(0.5)
        nginx_pids = [nginx.pid] + [int(x) for x in subprocess.run(
            ["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()]
        targets = [
            ("worker direct", workers[0], []),
            ("gateway + 1 worker", gws[1][0], [gws[1][1]]),
            ("gateway + 2 workers", gws[2][0], [gws[2][1]]),
            ("gateway + 1 worker, busy poll 100 µs", gws["busy"][0], [gws["busy"][1]]),
            ("nginx grpc_pass + 1 worker", f"127.0.0.1:{nginx1_port}", nginx_pids),
            ("nginx grpc_pass + 2 workers", f"127.0.0.1:{nginx_port}", nginx_pids),
        ]
        rows = []
        for model in ("echo", "mlp"):
            for label, url, pids in targets:
                for streaming in (False, True):
                    if streaming and label.startswith("nginx"):
                        cs = (1, 8, 32)  # nginx pins a stream to one upstream; measured anyway
                    else:
                        cs = (1, 8, 32)
                    for c in cs:
                        r = bench(url, model, c, streaming, pids)
                        rows.append((model, label, "stream" if streaming else "unary", c, r))
                        print(f"{model} {label} {'stream' if streaming else 'unary'} c={c}: "
                              f"{r['requests_per_s']:.0f}/s p50 {r['p50_ms']:.3f}", file=sys.stderr)
        # Added p50 at concurrency 1 on the identity model, interleaved rounds (c=1 latency
        # on a VM moves from run to run with the cost of waking idle cores).
        rounds = {label: [] for label, _, _ in targets}
        for _ in range(ROUNDS):
            for label, url, _ in targets:
                rounds[label].append(bench(url, "echo", 1, False, [])["p50_ms"] * 1000)
        # RSS of the 2-worker gateway with 1,000 open streams.
        url, pid = gws[2]
        idle = rss_mb(pid)
        loop = asyncio.new_event_loop()
        channels, queues, calls = loop.run_until_complete(open_streams(url, 1000))
        held = rss_mb(pid)
        for q in queues:
            q.put_nowait(None)
        for ch in channels:
            loop.run_until_complete(ch.close())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)

    print("| model | path | mode | concurrency | req/s | p50 ms | p99 ms | proxy CPU ms / 1k req | vs direct |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    direct = {(m, mode, c): r for m, l, mode, c, r in rows if l == "worker direct"}
    for model, label, mode, c, r in rows:
        base = direct[(model, mode, c)]["requests_per_s"]
        cpu = "" if r["cpu_ms_per_1k"] is None else f"{r['cpu_ms_per_1k']:.0f}"
        print(f"| {model} | {label} | {mode} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {cpu} | {r['requests_per_s'] / base:.2f}× |")
    print(f"\nAdded p50 at concurrency 1, identity model, unary, {ROUNDS} interleaved rounds of {SECONDS:.0f} s "
          "(each round's p50 minus the same round's direct p50):\n")
    print("| path | added p50 µs per round | median |")
    print("|---|---|---:|")
    for label, rs in rounds.items():
        if label == "worker direct":
            continue
        added = [a - b for a, b in zip(rs, rounds["worker direct"])]
        print(f"| {label} | {', '.join(f'{x:.0f}' for x in added)} | {statistics.median(added):.0f} |")
    print(f"\nworker direct p50 µs per round: {', '.join(f'{x:.0f}' for x in rounds['worker direct'])}")
    print(f"\nGateway RSS: {idle:.1f} MB idle, {held:.1f} MB with 1,000 open streams")


if __name__ == "__main__":
    main()
