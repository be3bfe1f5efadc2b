"""Triton's own clients through the gateway, unchanged: tritonclient unary and streaming,
perf_analyzer, and one stream's requests landing on both workers."""
import json
import os
import queue
import re
import subprocess
import time

import numpy as np
import tritonclient.grpc as grpcclient

from conftest import MODELS, ROOT, Gateway


def executions(server, model):
    return server.client.get_inference_statistics(model).model_stats[0].execution_count


def digits():
    s = json.loads((MODELS / "digits/samples.json").read_text())
    return np.array(s["inputs"], dtype=np.float32), s["labels"]


def test_tritonclient_through_the_gateway(mesh):
    gateway, workers = mesh
    c = gateway.client
    assert c.is_server_ready() and c.is_model_ready("digits")
    assert c.get_model_metadata("mlp").inputs[0].shape == [-1, 784]
    x, labels = digits()
    before = [executions(w, "digits") for w in workers]
    for _ in range(20):
        i = grpcclient.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        assert c.infer("digits", [i]).as_numpy("label").tolist() == labels
    after = [executions(w, "digits") for w in workers]
    assert sum(after) - sum(before) == 20


def test_one_stream_reaches_both_workers(mesh):
    gateway, workers = mesh
    c = gateway.client
    x, labels = digits()
    before = [executions(w, "digits") for w in workers]
    got = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for n in range(64):
            i = grpcclient.InferInput("input", [1, 64], "FP32")
            i.set_data_from_numpy(x[n % 8 : n % 8 + 1])
            c.async_stream_infer("digits", [i], request_id=str(n))
        results = [got.get(timeout=60) for _ in range(64)]
    finally:
        c.stop_stream()
    assert all(e is None for _, e in results), [e for _, e in results if e]
    assert [r.get_response().id for r, _ in results] == [str(n) for n in range(64)]
    assert [int(r.as_numpy("label")[0]) for r, _ in results] == [labels[n % 8] for n in range(64)]
    delta = [a - b for a, b in zip([executions(w, "digits") for w in workers], before)]
    assert all(d > 0 for d in delta), f"one stream spread over both workers: {delta}"


def test_perf_analyzer_through_the_gateway(mesh, tmp_path):
    gateway, _ = mesh
    data = tmp_path / "mlp.json"
    data.write_text(json.dumps({"data": [{"input": [0.25] * 784}]}))
    cmd = [str(ROOT / "scripts/perf-analyzer.sh"), "-m", "mlp", "-u", gateway.url, "-i", "grpc",
           "--input-data", str(data), "--measurement-mode", "count_windows",
           "--measurement-request-count", "50", "-s", "90", "--max-trials", "20",
           "--concurrency-range", "4", "--streaming"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"Server:\s+Inference count: \d+", out.stdout), out.stdout[-2000:]


def test_up_check_runs_the_local_mesh():
    from conftest import binary
    out = subprocess.run([binary("infermesh"), "up", "--listen", "127.0.0.1:0", "--check"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "infermesh is up: gateway on" in out.stdout
    assert re.search(r"digits: predicted (\[.*\]), expected \1", out.stdout), out.stdout


def test_up_restarts_a_dead_worker_and_stops_cleanly():
    import os
    import signal
    import threading
    import time

    from conftest import binary

    proc = subprocess.Popen([binary("infermesh"), "up", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "infermesh is up" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "up exited early"
            assert time.monotonic() < deadline
        m = re.search(r"gateway on (\S+), workers on (.*) \(pids (.*)\)", line)
        gateway, workers, pids = m.group(1), m.group(2).split(", "), [int(p) for p in m.group(3).split(", ")]
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        stderr_lines = []
        threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True).start()

        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not any("restarting" in l for l in stderr_lines):
            assert time.monotonic() < deadline, "the dead worker was not restarted"
            time.sleep(0.05)
        restarted = grpcclient.InferenceServerClient(workers[0])
        while True:
            try:
                if restarted.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the restarted worker never became ready"
            time.sleep(0.05)
        # The gateway notices the restarted worker at its next refresh; until then it may
        # briefly have no ready worker to offer. Poll (bounded) for a served request.
        x, labels = digits()
        c = grpcclient.InferenceServerClient(gateway)
        i = grpcclient.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        while True:
            try:
                assert c.infer("digits", [i]).as_numpy("label").tolist() == labels
                break
            except grpcclient.InferenceServerException:
                assert time.monotonic() < deadline, "the mesh did not serve again after the restart"
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "up exits 0 on SIGTERM"
    for w in workers:
        try:
            grpcclient.InferenceServerClient(w).is_server_live()
            alive = True
        except Exception:
            alive = False
        assert not alive, f"worker {w} still running after up stopped"


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_polling_serves_and_stops_spinning_when_idle(mesh):
    """--busy-poll-us keeps the gateway polling after each request; it must answer as
    usual and go back to sleep once requests stop (a spin that never ends burns a core)."""
    _, workers = mesh
    gateway = Gateway(*workers, extra=("--busy-poll-us", "200"))
    try:
        x, labels = digits()
        i = grpcclient.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        for _ in range(50):
            assert gateway.client.infer("digits", [i]).as_numpy("label").tolist() == labels
        before = cpu_seconds(gateway.proc.pid)
        time.sleep(1.0)  # the measuring window, not synchronisation
        assert cpu_seconds(gateway.proc.pid) - before < 0.5, "the gateway kept spinning while idle"
    finally:
        assert gateway.stop() == 0
