"""Soak: mixed good and hostile traffic through a gateway in front of two workers (release
builds) for a while (default 10 minutes). Good traffic: 4 tritonclient callers, unary and
streaming. Hostile traffic, all the time: fuzzed requests (the test suite's mutator),
queries that once crashed workers, a slow sender that stalls 32 MB messages part-way,
connections that send half a preface, and the patterns that once got around admission:
health and metadata calls declaring 4 MiB on both ports (70 at a time), half-SETTINGS
connections, a body trickled a byte a second, and callers with 1-5 ms deadlines. Every 30 s
it samples RSS and CPU of each process. Prints a markdown table; failed good requests must
be 0."""
import argparse
import os
import pathlib
import random
import socket
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
for name in ("worker", "gateway"):
    os.environ.setdefault(f"INFERMESH_INFERMESH_{name.upper()}_BIN", str(ROOT / f"target/release/infermesh-{name}"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from conftest import HOSTILE, Gateway, Worker  # noqa: E402
from test_connections import connect, headers, poll, refused  # noqa: E402
from test_fuzz import SEED, mutants  # noqa: E402
from test_hostile import bytes_elements, raw_request  # noqa: E402
from test_trust import call_headers, half_settings, hasty  # noqa: E402

MiB = 1 << 20


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    args = ap.parse_args()
    workers = [Worker("--model-repository", str(HOSTILE), "--grpc-stall-timeout", "5s") for _ in range(2)]
    gateway = Gateway(*workers, extra=("--grpc-stall-timeout", "5s"))
    procs = {"gateway": gateway, "worker 1": workers[0], "worker 2": workers[1]}
    stop = threading.Event()
    counts = {"good": 0, "good failed": 0, "hostile": 0, "stalls": 0, "stalled MB": 0, "half prefaces": 0,
              "small floods": 0, "half settings": 0, "trickles": 0, "hasty": 0}
    failures = []
    lock = threading.Lock()

    def count(key, n=1):
        with lock:
            counts[key] += n

    def good(streaming):
        c = grpcclient.InferenceServerClient(gateway.url)
        x = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
        data = np.arange(8, dtype=np.float32).reshape(2, 4)
        x.set_data_from_numpy(data)
        while not stop.is_set():
            try:
                if streaming:
                    got = []
                    c.start_stream(callback=lambda result, error: got.append((result, error)))
                    for i in range(20):
                        c.async_stream_infer("vec_fp32", [x], request_id=str(i))
                    c.stop_stream()
                    ok = len(got) == 20 and all(e is None and (r.as_numpy("OUTPUT0") == data).all() for r, e in got)
                    count("good", 20)
                else:
                    ok = (c.infer("vec_fp32", [x]).as_numpy("OUTPUT0") == data).all()
                    count("good")
                if not ok:
                    count("good failed")
            except Exception as e:  # noqa: BLE001 - every failure counts
                count("good failed")
                failures.append(str(e)[:200])
        c.close()

    def fuzz():
        rng = random.Random(SEED)
        gen = mutants(rng)
        channel = grpc.insecure_channel(gateway.url)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        deaths = [
            raw_request("text", [("INPUT0", "BYTES", [1_000_000_000])], [bytes_elements(b"a")]),
            raw_request("matrix_fp32", [("INPUT0", "FP32", [2**62, 1]), ("INPUT1", "INT32", [0]),
                                        ("INPUT2", "UINT8", [2])], [b"", b"", b"\1\2"]),
            raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4], {"infermesh_cancel": True}),
        ]
        while not stop.is_set():
            data = next(gen) if rng.random() < 0.9 else rng.choice(deaths).SerializeToString()
            try:
                infer(data, timeout=10)
            except grpc.RpcError:
                pass
            count("hostile")
        channel.close()

    def slow_sender():
        size = 32 * MiB
        while not stop.is_set():
            try:
                s, c = connect(gateway.url)
                c.send_headers(1, headers("ModelInfer"))
                c.send_data(1, b"\0" + size.to_bytes(4, "big"))
                sent = 0
                while sent < size // 2 and not stop.is_set():
                    window = c.local_flow_control_window(1)
                    if window <= 0:
                        if refused(poll(s, c, 2)):
                            break
                        continue
                    n = min(window, c.max_outbound_frame_size, 1 << 16)
                    c.send_data(1, b"\0" * n)
                    s.sendall(c.data_to_send())
                    sent += n
                count("stalled MB", sent // MiB)
                stop.wait(6)  # past the stall timeout: the server drops it
                s.close()
                count("stalls")
            except Exception:  # noqa: BLE001 - refused or reset: fine, try again
                stop.wait(1)

    def half_prefaces():
        host, port = gateway.url.rsplit(":", 1)
        while not stop.is_set():
            socks = []
            for _ in range(20):
                try:
                    s = socket.create_connection((host, int(port)), timeout=5)
                    s.sendall(b"PRI * HTTP/2.0\r\n")
                    socks.append(s)
                except OSError:
                    pass
            stop.wait(12)  # past the handshake timeout
            for s in socks:
                s.close()
            count("half prefaces", len(socks))

    def small_floods():
        """70 health and metadata calls declaring 4 MiB each, on the main and health ports."""
        paths = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                 "/inference.GRPCInferenceService/ModelMetadata"]
        while not stop.is_set():
            for url in (gateway.url, gateway.health_url, workers[0].health_url):
                socks = []
                for _ in range(5):
                    try:
                        s, c = connect(url)
                        for i in range(14):
                            path = paths[i % len(paths)] if url == gateway.url else paths[i % 2]
                            c.send_headers(1 + 2 * i, call_headers(path))
                            c.send_data(1 + 2 * i, b"\0" + (4 * MiB).to_bytes(4, "big") + b"\0" * 4096)
                        s.sendall(c.data_to_send())
                        socks.append(s)
                    except OSError:
                        pass
                stop.wait(1)
                for s in socks:
                    s.close()
                count("small floods")

    def half_settings_conns():
        while not stop.is_set():
            socks = []
            for url in (gateway.url, gateway.health_url):
                for _ in range(10):
                    try:
                        socks.append(half_settings(url))
                    except OSError:
                        pass
            stop.wait(12)  # past the handshake timeout
            for s in socks:
                s.close()
            count("half settings", len(socks))

    def trickle():
        while not stop.is_set():
            try:
                s, c = connect(gateway.url)
                c.send_headers(1, headers("ModelInfer"))
                c.send_data(1, b"\0" + (8 * MiB).to_bytes(4, "big") + b"\0" * 8192)
                s.sendall(c.data_to_send())
                while not stop.is_set() and not refused(poll(s, c, 1)):
                    c.send_data(1, b"\0")
                    s.sendall(c.data_to_send())
                s.close()
                count("trickles")
            except Exception:  # noqa: BLE001 - dropped or reset: start another
                stop.wait(1)

    def hasty_caller():
        x = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        hasty(gateway.url, "vec_fp32", x, stop, [0.001, 0.002, 0.005], count=lambda: count("hasty"))

    threads = [threading.Thread(target=good, args=(i % 2 == 1,)) for i in range(4)]
    threads += [threading.Thread(target=f) for f in (fuzz, slow_sender, half_prefaces, small_floods,
                                                       half_settings_conns, trickle, hasty_caller)]
    start = time.monotonic()
    cpu0 = {k: cpu_s(p.proc.pid) for k, p in procs.items()}
    for t in threads:
        t.start()
    rows = []
    try:
        while time.monotonic() - start < args.seconds:
            stop.wait(min(30, args.seconds - (time.monotonic() - start)))
            with lock:
                snap = dict(counts)
            rows.append((time.monotonic() - start, {k: rss_mb(p.proc.pid) for k, p in procs.items()},
                         {k: cpu_s(p.proc.pid) - cpu0[k] for k, p in procs.items()}, snap))
            print(f"{rows[-1][0]:5.0f}s rss {rows[-1][1]} good {snap['good']} failed {snap['good failed']}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        alive = {k: p.proc.poll() is None for k, p in procs.items()}
        gateway.stop()
        for w in workers:
            w.stop()
    print(f"\n## Soak: {args.seconds:.0f} s of mixed good and hostile traffic, gateway + 2 workers\n")
    print("| t (s) | gateway RSS MB | worker 1 RSS MB | worker 2 RSS MB | gateway CPU s | workers CPU s | good requests | good failed | hostile requests | stalled senders (MB sent) | half prefaces | 70-call 4 MiB small-call floods | half-SETTINGS conns | trickled bodies | 1-5 ms deadline calls |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, rss, cpu, c in rows:
        print(f"| {t:.0f} | {rss['gateway']:.1f} | {rss['worker 1']:.1f} | {rss['worker 2']:.1f} | "
              f"{cpu['gateway']:.1f} | {cpu['worker 1'] + cpu['worker 2']:.1f} | {c['good']} | {c['good failed']} | "
              f"{c['hostile']} | {c['stalls']} ({c['stalled MB']}) | {c['half prefaces']} | {c['small floods']} | "
              f"{c['half settings']} | {c['trickles']} | {c['hasty']} |")
    print(f"\nAll processes alive at the end: {alive}")
    if failures:
        print(f"First failures: {failures[:5]}")
    sys.exit(0 if counts["good failed"] == 0 and all(alive.values()) else 1)


if __name__ == "__main__":
    main()
