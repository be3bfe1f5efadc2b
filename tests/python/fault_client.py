"""Run inside a network namespace (`ip netns exec NS python fault_client.py ...`) by
test_netns_faults.py: the client side of the fault tests.

    load URL SECONDS CONCURRENCY   digits requests with a 5 s deadline; prints JSON counts
    stats URL...                   prints each server's digits execution count (JSON list)
    ready URL                      waits (bounded) until the server is ready
    timed URL SECONDS CONCURRENCY DEADLINE [METRICS_URL]
                                   digits requests; prints JSON: each request's start
                                   (Unix time), latency and outcome, and, every 100 ms,
                                   the gateway's attempts per worker from METRICS_URL
    stream URL MESSAGES            one ModelStreamInfer stream of MESSAGES digits
                                   requests; prints JSON: the ids answered, in the order
                                   they came, and the errors
"""
import json
import queue
import re
import pathlib
import sys
import threading
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

MODELS = pathlib.Path(__file__).resolve().parents[2] / "models"


def requests_for(url, seconds, concurrency, deadline):
    """digits requests from `concurrency` threads for `seconds`: each one's start (Unix
    time), latency, and error (None when it succeeded)."""
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    done, lock = [], threading.Lock()
    end = time.monotonic() + seconds

    def run():
        c = grpcclient.InferenceServerClient(url)
        mine = []
        while time.monotonic() < end:
            i = grpcclient.InferInput("input", [1, 64], "FP32")
            i.set_data_from_numpy(x)
            t, p = time.time(), time.perf_counter()
            try:
                c.infer("digits", [i], client_timeout=deadline)
                error = None
            except Exception as e:  # noqa: BLE001 - every failure counts
                error = str(e)[:300]
            mine.append((t, time.perf_counter() - p, error))
        with lock:
            done.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return sorted(done, key=lambda r: r[0])


def load(url, seconds, concurrency):
    done = requests_for(url, seconds, concurrency, 5.0)
    errors = [e for _, _, e in done if e is not None]
    print(json.dumps({"sent": len(done), "failed": len(errors), "errors": errors[:3]}))


def timed(url, seconds, concurrency, deadline, metrics_url=None):
    samples, end = [], time.monotonic() + seconds

    def scrape():
        line = re.compile(r'^infermesh_gateway_worker_attempts_total\{worker="([^"]+)"\} (\d+)', re.M)
        while time.monotonic() < end + 1:
            t = time.time()
            try:
                text = urllib.request.urlopen(metrics_url, timeout=1).read().decode()
                samples.append((t, {w: int(n) for w, n in line.findall(text)}))
            except OSError:
                pass
            time.sleep(0.1)  # the sampling period

    scraper = threading.Thread(target=scrape)
    if metrics_url:
        scraper.start()
    done = requests_for(url, seconds, concurrency, deadline)
    if metrics_url:
        scraper.join()
    requests = [(t, dt, error is None) for t, dt, error in done]
    print(json.dumps({"requests": requests, "attempts": samples}))


def stream(url, messages):
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    got = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    ids, errors = [], []

    def take():
        result, error = got.get(timeout=60)
        if error:
            errors.append(str(error)[:300])
        else:
            ids.append(int(result.get_response().id))

    try:
        for n in range(messages):
            i = grpcclient.InferInput("input", [1, 64], "FP32")
            i.set_data_from_numpy(x)
            c.async_stream_infer("digits", [i], request_id=str(n))
            # At most 8 unanswered at a time: the stream stays busy for the whole fault.
            while n + 1 - len(ids) - len(errors) > 8:
                take()
            time.sleep(0.005)  # pacing: the stream lasts through the fault
        while len(ids) + len(errors) < messages:
            take()
    finally:
        c.stop_stream()
    print(json.dumps({"ids": ids, "errors": errors[:3], "failed": len(errors)}))


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
    elif mode == "timed":
        timed(args[0], float(args[1]), int(args[2]), float(args[3]), args[4] if len(args) > 4 else None)
    elif mode == "stream":
        stream(args[0], int(args[1]))
    elif mode == "stats":
        stats(args)
    else:
        ready(args[0])
