"""Run inside a network namespace (`ip netns exec NS python fault_client.py ...`) by
test_netns_faults.py: the client side of the fault tests.

    load URL SECONDS CONCURRENCY   digits requests with a 5 s deadline; prints JSON counts
    stats URL...                   prints each server's digits execution count (JSON list)
    ready URL                      waits (bounded) until the server is ready
"""
import json
import pathlib
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient

MODELS = pathlib.Path(__file__).resolve().parents[2] / "models"


def load(url, seconds, concurrency):
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    sent, failed, errors, lock = [0], [0], [], threading.Lock()
    end = time.monotonic() + seconds

    def run():
        c = grpcclient.InferenceServerClient(url)
        while time.monotonic() < end:
            i = grpcclient.InferInput("input", [1, 64], "FP32")
            i.set_data_from_numpy(x)
            try:
                c.infer("digits", [i], client_timeout=5.0)
                ok = True
            except Exception as e:  # noqa: BLE001 - every failure counts
                ok = False
                with lock:
                    errors.append(str(e)[:300])
            with lock:
                sent[0] += 1
                failed[0] += 0 if ok else 1

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps({"sent": sent[0], "failed": failed[0], "errors": errors[:3]}))


def stats(urls):
    out = []
    for url in urls:
        c = grpcclient.InferenceServerClient(url)
        out.append(c.get_inference_statistics("digits", client_timeout=5.0).model_stats[0].execution_count)
    print(json.dumps(out))


def ready(url):
    c = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + 60
    while True:
        try:
            if c.is_server_ready(client_timeout=2.0):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} not ready within 60 s")
        time.sleep(0.1)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "load":
        load(args[0], float(args[1]), int(args[2]))
    elif mode == "stats":
        stats(args)
    else:
        ready(args[0])
