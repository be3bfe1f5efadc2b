"""`infermesh up` says why it failed, at once, in the worker's own words; passes flags after
`--` to its workers; serves metrics when asked; and its hints name models the repository
really has."""
import os
import re
import shutil
import subprocess
import time
import urllib.request

from conftest import MODELS, binary


def up(*args, env=None, timeout=60):
    started = time.monotonic()
    out = subprocess.run([binary("infermesh"), "up", "--listen", "127.0.0.1:0", "--check", *args],
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return out, time.monotonic() - started


def test_without_onnx_runtime_up_fails_at_once_with_the_workers_reason():
    out, took = up(env={"INFERMESH_ONNXRUNTIME_LIB": "/nonexistent/libonnxruntime.so"}, timeout=30)
    assert out.returncode != 0
    assert "cannot load ONNX Runtime from /nonexistent/libonnxruntime.so" in out.stderr, out.stderr[-2000:]
    assert "exited before listening" in out.stderr


def test_a_repository_where_every_model_fails_stops_up_with_the_reason(tmp_path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    out, _ = up("--model-repository", str(tmp_path), timeout=30)
    assert out.returncode != 0
    assert "can serve nothing" in out.stderr and "no model could be loaded" in out.stderr, out.stderr[-2000:]
    assert "model=broken" in out.stderr and "Protobuf parsing failed" in out.stderr


def test_worker_flags_metrics_and_hints_follow_the_repository(tmp_path):
    shutil.copytree(MODELS / "mlp", tmp_path / "mlp")
    # --max-models 0 is valid for a worker; a typo would fail up with the worker's own clap error.
    out, _ = up("--model-repository", str(tmp_path), "--metrics", "--workers", "1", "--",
                "--intra-op-threads", "1", "--max-models", "3", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    hints = [line for line in out.stdout.splitlines() if line.startswith("  ")]
    assert hints and not any("digits" in h for h in hints), "no hint for a model this repository does not have"
    assert "inference.GRPCInferenceService/ModelMetadata" in out.stdout and '"name":"mlp"' in out.stdout
    assert 'get_model_metadata("mlp")' in out.stdout
    urls = re.search(r"metrics: gateway (\S+), workers (\S+)", out.stdout)
    assert urls, out.stdout
    # --check has stopped the mesh; that the ports were printed and distinct is what we see.
    assert urls.group(1) != urls.group(2)


def test_worker_flags_reach_the_workers():
    out, _ = up("--workers", "1", "--", "--no-such-flag", timeout=30)
    assert out.returncode != 0
    assert "--no-such-flag" in out.stderr and "exited before listening" in out.stderr, out.stderr[-2000:]


def test_workers_do_not_outlive_a_killed_up():
    import signal

    proc = subprocess.Popen([binary("infermesh"), "up", "--listen", "127.0.0.1:0", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pids = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            m = re.search(r"\(pids ([\d, ]+)\)", line)
            if m:
                pids = [int(p) for p in m.group(1).split(", ")]
                break
            assert time.monotonic() < deadline
        assert len(pids) == 2
        proc.send_signal(signal.SIGKILL)  # no handler runs, no drop: only the kernel can tell them
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]
                  for p in pids):
            assert time.monotonic() < deadline, "workers outlived their up"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:  # only if still ours: a pid can be reused once its worker is gone
            try:
                if b"infermesh" in open(f"/proc/{p}/cmdline", "rb").read():
                    os.kill(p, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def test_up_serves_tls_with_a_certificate_and_its_hints_say_how_to_call_it(tmp_path):
    from pki import Ca

    ca = Ca(tmp_path, "ca")
    cert, key = ca.leaf("server", ["localhost", "127.0.0.1"], 1)
    out, _ = up("--workers", "1", "--cert", str(cert), "--key", str(key), "--ca", str(ca.cert), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # The self-check request went through TLS; the hints carry the CA.
    assert "digits: predicted" in out.stdout, out.stdout
    assert re.search(r"gateway on https://127\.0\.0\.1:\d+,", out.stdout), out.stdout
    assert f"--ca {ca.cert}" in out.stdout and f"-cacert {ca.cert}" in out.stdout, out.stdout
    assert "root_certificates=" in out.stdout, out.stdout


def test_up_survives_a_failed_restart_with_the_other_worker_serving(tmp_path):
    """A worker dies while its binary is gone (a rebuild in progress): the restart fails,
    is tried again with a backoff, and up says so, while the other worker keeps serving."""
    import signal
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient

    exe = tmp_path / "infermesh"
    shutil.copy(binary("infermesh"), exe)
    proc = subprocess.Popen([str(exe), "up", "--listen", "127.0.0.1:0", "--workers", "2",
                             "--model-repository", str(MODELS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    try:
        deadline, gateway, pids = time.monotonic() + 120, None, []
        for line in proc.stdout:
            m = re.search(r"gateway on (\S+), workers on .*\(pids ([\d, ]+)\)", line)
            if m:
                gateway, pids = m.group(1).rstrip(","), [int(p) for p in m.group(2).split(", ")]
                break
            assert time.monotonic() < deadline
        threading.Thread(target=lambda: list(proc.stdout), daemon=True).start()
        exe.unlink()
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not any("could not be restarted" in e and "1 of 2 workers up" in e for e in errors):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(errors)[-3000:]
            time.sleep(0.05)
        c = grpcclient.InferenceServerClient(gateway)
        x = grpcclient.InferInput("input", [1, 784], "FP32")
        x.set_data_from_numpy(np.ones((1, 784), np.float32))
        for _ in range(20):
            assert c.infer("mlp", [x]).as_numpy("output").shape == (1, 10)
        assert proc.poll() is None, "up is still serving"
    finally:
        proc.terminate()
        proc.wait(timeout=90)


def test_check_sends_a_request_to_every_model_and_names_each_that_failed(tmp_path):
    shutil.copytree(MODELS / "mlp", tmp_path / "mlp")
    shutil.copytree(MODELS / "multi_io", tmp_path / "multi_io")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    out, _ = up("--model-repository", str(tmp_path), "--workers", "1", timeout=120)
    assert out.returncode != 0, out.stdout
    assert "check: mlp: answered" in out.stdout and "check: multi_io: answered" in out.stdout, out.stdout
    assert "check failed for 1 of 3 models: broken (not loaded" in out.stderr, out.stderr[-2000:]
    assert "Protobuf parsing failed" in out.stderr


def test_up_with_a_private_certificate_and_no_ca_fails_fast_with_the_fix(tmp_path):
    from pki import Ca

    ca = Ca(tmp_path, "ca")
    cert, key = ca.leaf("server", ["localhost", "127.0.0.1"], 1)
    # Bounded below up's 120 s readiness wait: it must fail, not wait that out.
    out, _ = up("--workers", "1", "--cert", str(cert), "--key", str(key), timeout=60)
    assert out.returncode != 0
    assert "UnknownIssuer" in out.stderr and "hint:" in out.stderr and "--ca" in out.stderr, out.stderr[-2000:]


def test_gateway_flags_reach_the_gateway_and_its_own_ones_are_refused():
    out, _ = up("--workers", "1", "--gateway-flag", "--max-stream-inflight=7", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    out, _ = up("--workers", "1", "--gateway-flag", "--no-such-flag", timeout=60)
    assert out.returncode != 0 and "--gateway-flag" in out.stderr and "--no-such-flag" in out.stderr, out.stderr
    out, _ = up("--workers", "1", "--gateway-flag", "--grpc-port=1", timeout=60)
    assert out.returncode != 0 and "up sets this itself; use --listen" in out.stderr, out.stderr
