"""The infermesh CLI against a real worker: infer, models, health."""
import json
import os
import subprocess

from conftest import MODELS, binary


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("infermesh"), *args], capture_output=True, text=True, timeout=60)


def test_infer_prints_outputs(worker):
    out = cli("infer", "--url", worker.url, "--model", "digits", "--input", f"input=@{MODELS / 'digits/example.json'}", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = json.loads((MODELS / "digits/samples.json").read_text())["labels"][0]
    assert result["label"] == [expected]
    assert len(result["probabilities"][0]) == 10

    out = cli("infer", "--url", worker.url, "--model", "multi_io",
              "--input", 'text=[["a"]]', "--input", "x=[[1,2,3,4]]", "--input", "k=[[41]]", "--input", "h=[[0.5,-1]]")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
    assert json.loads(lines["text_twice"]) == [["a", "a"]]
    assert json.loads(lines["k_plus"]) == [[42]]


def test_infer_reports_server_errors(worker):
    out = cli("infer", "--url", worker.url, "--model", "digits", "--input", "input=[[1,2,3]]")
    assert out.returncode != 0
    assert "dim 1 is 3" in out.stderr


def test_models_and_health(worker):
    out = cli("models", "--url", worker.url, "--json")
    assert out.returncode == 0, out.stderr
    states = {(m["name"], m["state"]) for m in map(json.loads, out.stdout.splitlines())}
    assert ("digits", "READY") in states and ("mlp", "READY") in states
    out = cli("health", "--url", worker.url)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"
    out = cli("health", "--url", worker.url, "--service", "no_such_model")
    assert out.returncode != 0


def test_bench_load_generator(worker):
    for mode in ([], ["--streaming"]):
        out = cli("bench", "--url", worker.url, "--model", "digits", "--concurrency", "4", "--requests", "200", "--json", *mode)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert (r["ok"], r["errors"]) == (200, 0), r
        assert r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    # Bad input is counted by status, not fatal.
    out = cli("bench", "--url", worker.url, "--model", "digits", "--input", "input=[[1,2]]", "--requests", "20", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["ok"] == 0 and r["errors_by_status"] == {"InvalidArgument": 20}, r


def test_version_names_the_git_revision():
    import re

    from conftest import ROOT

    rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    for name in ["infermesh", "infermesh-worker", "infermesh-gateway"]:
        out = subprocess.run([binary(name), "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        m = re.fullmatch(r"(\S+) \d+\.\d+\.\d+ \(([0-9a-f]{12}|unknown)\)", out.stdout.strip())
        assert m and m.group(1) == name, out.stdout
        if rev.returncode == 0:  # built from this checkout
            assert m.group(2) == rev.stdout.strip(), (out.stdout, rev.stdout)


def flags(help_text):
    import re

    return sorted(re.findall(r"^\s+(-\w, )?(--[\w-]+)", help_text, re.M))


def test_infermesh_gateway_and_worker_are_the_standalone_binaries(worker):
    for sub in ["gateway", "worker"]:
        one = cli(sub, "--help")
        alone = subprocess.run([binary(f"infermesh-{sub}"), "--help"], capture_output=True, text=True, timeout=60)
        assert one.returncode == 0 and alone.returncode == 0
        assert flags(one.stdout) == flags(alone.stdout) and len(flags(one.stdout)) > 20
    # And it runs: a gateway from the one binary answers through the worker.
    from conftest import Server

    gw = Server([(binary("infermesh"), "gateway"), "--workers", worker.url, "--worker-refresh", "100ms"])
    try:
        out = cli("infer", "--url", gw.url, "--model", "digits", "--input", f"input=@{MODELS / 'digits/example.json'}",
                  "--json")
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["probabilities"][0]) == 10
    finally:
        assert gw.stop() == 0


def test_a_user_error_is_one_line_without_a_backtrace():
    """RUST_BACKTRACE=1 is common on developer machines: a user's mistake still prints one
    line naming it, and exits 1."""
    env = {**os.environ, "RUST_BACKTRACE": "1"}
    out = subprocess.run([binary("infermesh-worker"), "--model-repository", "/no/such/repository",
                          "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "--model-repository" in lines[0], out.stderr
    assert "backtrace" not in out.stderr.lower(), out.stderr


def test_metrics_bind_where_grpc_binds_unless_told(worker):
    """A server bound to 127.0.0.1 (the fixture passes no --metrics-address) opens nothing on
    other interfaces."""
    assert worker.metrics_url.startswith("127.0.0.1:"), worker.metrics_url


def test_load_and_unload_and_models_json_through_a_gateway():
    from conftest import Gateway, Worker

    w = Worker("--model-control-mode", "explicit", "--load-model", "*")
    g = Gateway(w, extra=("--model-control-mode", "explicit"))
    try:
        def state(name):
            out = cli("models", "--url", g.url, "--json")
            assert out.returncode == 0, out.stderr
            rows = [json.loads(line) for line in out.stdout.splitlines()]
            workers = [r for r in rows if "worker" in r]
            assert workers and all(isinstance(r["ready"], bool) for r in workers), rows
            return {r["state"] for r in rows if r.get("name") == name}

        out = cli("unload", "--url", g.url, "mlp")
        assert out.returncode == 0 and "mlp: unloaded" in out.stdout, out.stderr
        assert state("mlp") == {"UNAVAILABLE"}
        out = cli("load", "--url", g.url, "mlp")
        assert out.returncode == 0 and "mlp: loaded" in out.stdout, out.stderr
        assert state("mlp") == {"READY"}
        out = cli("load", "--url", g.url, "../etc")
        assert out.returncode == 1 and "model_name '../etc': not a model name" in out.stderr, out.stderr
    finally:
        assert g.stop() == 0
        assert w.stop() == 0


def test_infer_models_and_health_on_the_http_port(worker, mesh):
    """http:// URLs naming the HTTP/REST port: the same answers as on the gRPC port, byte
    for byte (every datatype of multi_io included), against a worker and a gateway."""
    gateway, _ = mesh
    digits = ("--model", "digits", "--input", f"input=@{MODELS / 'digits/example.json'}", "--json")
    multi = ("--model", "multi_io", "--input", 'text=[["a"]]', "--input", "x=[[1,2,3,4]]",
             "--input", "k=[[41]]", "--input", "h=[[0.5,-1]]")
    for server in (worker, gateway):
        rest = f"http://{server.http_url}"
        for args in (digits, multi):
            grpc_out = cli("infer", "--url", server.url, *args)
            http_out = cli("infer", "--url", rest, *args)
            assert grpc_out.returncode == 0 and http_out.returncode == 0, http_out.stderr
            assert http_out.stdout == grpc_out.stdout
        out = cli("infer", "--url", rest, "--protocol", "http", *digits)
        assert out.returncode == 0 and json.loads(out.stdout)["label"], out.stderr
        out = cli("infer", "--url", rest, "--model", "digits", "--input", "input=[[1,2,3]]")
        assert out.returncode != 0 and "HTTP 400" in out.stderr and "dim 1 is 3" in out.stderr, out.stderr
        out = cli("infer", "--url", rest, "--protocol", "grpc", *digits)
        assert out.returncode != 0 and "HTTP/REST port" in out.stderr, out.stderr

        out = cli("health", "--url", rest)
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        out = cli("health", "--url", rest, "--service", "digits")
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        out = cli("health", "--url", rest, "--service", "no_such_model")
        assert out.returncode != 0 and "NOT_SERVING" in out.stdout + out.stderr, out.stderr

    # The index, and the gateway's worker lines, as on gRPC.
    for server in (worker, gateway):
        grpc_out = cli("models", "--url", server.url, "--json")
        http_out = cli("models", "--url", f"http://{server.http_url}", "--json")
        assert grpc_out.returncode == 0 and http_out.returncode == 0, http_out.stderr
        assert http_out.stdout == grpc_out.stdout
    assert '"worker"' in http_out.stdout
