"""Fault table: 2,000 digits requests at concurrency 8 through the gateway in front of two
workers; at request 500 one worker gets the fault. Prints requests sent, failed, and
latency percentiles over the whole run and over the 500 requests after the fault."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))
os.environ.setdefault("INFERMESH_INFERMESH_WORKER_BIN", str(pathlib.Path(__file__).resolve().parents[1] / "target/release/infermesh-worker"))
os.environ.setdefault("INFERMESH_INFERMESH_GATEWAY_BIN", str(pathlib.Path(__file__).resolve().parents[1] / "target/release/infermesh-gateway"))

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from conftest import MODELS, Gateway, Worker  # noqa: E402


def run(fault):
    workers = [Worker("--intra-op-threads", "1", "--shutdown-grace", "1s"), Worker("--intra-op-threads", "1")]
    gateway = Gateway(*workers)
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    lat, failed, lock, count = [], [], threading.Lock(), [0]
    fault_at = [None]

    def one(c):
        i = grpcclient.InferInput("input", [1, 64], "FP32")
        i.set_data_from_numpy(x)
        t = time.perf_counter()
        try:
            c.infer("digits", [i])
            ok = True
        except Exception:  # noqa: BLE001
            ok = False
        dt = time.perf_counter() - t
        with lock:
            count[0] += 1
            n = count[0]
            lat.append((n, dt))
            if not ok:
                failed.append(n)
            if n == 500 and fault:
                fault_at[0] = n
                workers[0].proc.send_signal(fault)

    def worker():
        c = grpcclient.InferenceServerClient(gateway.url)
        for _ in range(250):
            one(c)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    gateway.stop()
    for w in workers:
        if w.proc.poll() is None:
            w.stop()
    during = sorted(d for n, d in lat if 500 <= n < 1000)
    allv = sorted(d for _, d in lat)
    pct = lambda v, p: v[int((len(v) - 1) * p)] * 1000  # noqa: E731
    return len(lat), len(failed), pct(allv, 0.5), pct(allv, 0.99), pct(during, 0.99), max(during) * 1000


def main():
    print("| fault (at request 500 of 2,000, concurrency 8) | sent | failed | p50 ms | p99 ms | p99 ms in the 500 after | max ms in the 500 after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, sig in [("none", None), ("SIGKILL one of two workers", signal.SIGKILL),
                       ("SIGTERM one of two workers (rolling restart)", signal.SIGTERM)]:
        sent, failed, p50, p99, p99_during, max_during = run(sig)
        print(f"| {label} | {sent} | {failed} | {p50:.2f} | {p99:.2f} | {p99_during:.2f} | {max_during:.1f} |")


if __name__ == "__main__":
    main()
