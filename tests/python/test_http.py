"""KServe v2 HTTP/REST with Triton's own HTTP client (tritonclient.http), against a worker
and through a gateway: health, metadata, config, statistics, the repository index, and
inference with JSON and with binary tensor data (every datatype, a requested-output subset,
async), outputs equal to Python onnxruntime; errors as {"error": ...} with their status."""
import json
import re
import subprocess
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import MODELS, ROOT, Gateway, Worker, binary
from test_tritonclient import NUMPY, multi_io_inputs

RNG = np.random.RandomState(0)


@pytest.fixture(scope="module")
def servers():
    worker = Worker()
    gateway = Gateway(worker)
    yield {"worker": worker, "gateway": gateway}
    gateway.stop()
    worker.stop()


@pytest.fixture(params=["worker", "gateway"])
def server(request, servers):
    return servers[request.param]


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(server.http_url)
    yield c
    c.close()


def reference(model, feeds):
    sess = ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"].startswith("infermesh") and "model_repository" in meta["extensions"]
    m = client.get_model_metadata("mlp")
    assert m["name"] == "mlp" and m["versions"] == ["1"]
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp" and config["input"][0]["dims"] == [784]
    stats = client.get_inference_statistics("mlp")
    assert stats["model_stats"][0]["name"] == "mlp"
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"], m.get("version")) for m in index} >= {("mlp", "READY", "1")}


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_onnxruntime(client, binary):
    x = RNG.rand(3, 784).astype(np.float32)
    i = httpclient.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    result = client.infer("mlp", [i], outputs=[out], request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_allclose(result.as_numpy("output"), reference("mlp", {"input": x})["output"], rtol=1e-5, atol=1e-5)
    # Async, outputs not named (binary_data_output: the client's default).
    pending = client.async_infer("mlp", [i])
    np.testing.assert_allclose(pending.get_result().as_numpy("output"), reference("mlp", {"input": x})["output"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_fp16_and_a_requested_subset(client, binary):
    grpc_inputs, feeds = multi_io_inputs(3)
    inputs = []
    for name, arr in feeds.items():
        dt = {"text": "BYTES", "x": "FP32", "k": "INT32", "h": "FP16"}[name]
        i = httpclient.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    ref = reference("multi_io", feeds)
    result = client.infer("multi_io", inputs, outputs=[httpclient.InferRequestedOutput("text_twice", binary_data=binary),
                                                      httpclient.InferRequestedOutput("h_neg", binary_data=binary)])
    got = result.as_numpy("text_twice")
    assert [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got] == ref["text_twice"].tolist()
    np.testing.assert_array_equal(result.as_numpy("h_neg").astype(np.float16), ref["h_neg"])
    assert result.as_numpy("y") is None, "only the requested outputs come back"


@pytest.mark.parametrize("triton", list(NUMPY))
def test_every_datatype_round_trips(client, triton):
    name = f"out_{triton.lower()}"
    meta = client.get_model_metadata("all_types")
    dtype = NUMPY[triton]
    want = np.arange(6).reshape(2, 3) % 2 == 1 if dtype is np.bool_ else (np.arange(6).reshape(2, 3) * 3).astype(dtype)
    inputs = []
    for m in meta["inputs"]:
        i = httpclient.InferInput(m["name"], [2, 3], m["datatype"])
        # tritonclient sends BF16 only as binary data.
        binary = m["datatype"] == "BF16" or triton == "BF16"
        if m["datatype"] == triton:
            i.set_data_from_numpy(want, binary_data=binary)
        elif m["datatype"] == "BYTES":
            i.set_data_from_numpy(np.full((2, 3), b"z", dtype=np.object_), binary_data=binary)
        else:
            i.set_data_from_numpy(np.zeros((2, 3), dtype=NUMPY[m["datatype"]]), binary_data=binary)
        inputs.append(i)
    result = client.infer("all_types", inputs, outputs=[httpclient.InferRequestedOutput(name, binary_data=True)])
    np.testing.assert_array_equal(result.as_numpy(name).astype(dtype), want)


def raw(server, method, path, body=None, headers=None):
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_mistakes_get_their_status_and_a_message_naming_the_field(server, client):
    status, headers, body = raw(server, "GET", "/v2/models/nope")
    assert status == 404 and json.loads(body)["reason"] == "model-not-found", body
    assert headers.get("infermesh-reason") == "model-not-found"
    bad = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [1, 2]}]}).encode()
    status, _, body = raw(server, "POST", "/v2/models/mlp/infer", bad)
    assert status == 400 and "3136" in json.loads(body)["error"], body
    status, _, body = raw(server, "POST", "/v2/models/mlp/infer", b'{"inputs": [')
    assert status == 400 and "the request's JSON" in json.loads(body)["error"], body
    deep = b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":' + b"[" * 10000 + b"]" * 10000 + b"}]}"
    status, _, body = raw(server, "POST", "/v2/models/mlp/infer", deep)
    assert status == 400 and "recursion limit" in json.loads(body)["error"], body
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 3136}}]}).encode()
    status, _, body = raw(server, "POST", "/v2/models/mlp/infer", header + b"\0" * 100,
                          {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "binary_data_size is 3136 bytes but only 100" in json.loads(body)["error"], body
    status, _, body = raw(server, "POST", "/v2/models/mlp/infer", header, {"Inference-Header-Content-Length": "99999"})
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(body)["error"], body
    status, _, body = raw(server, "GET", "/v3/whatever")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"], body
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "nope" in e.value.message()
    # Still serving.
    assert client.is_server_ready()


def test_every_curl_in_the_docs_works(servers):
    """docs/http.md's curl and infermesh lines, run as written against the gateway
    (localhost:8000 replaced by its HTTP address)."""
    text = (ROOT / "docs" / "http.md").read_text()
    blocks = [l for b in re.findall(r"```sh\n(.*?)```", text, re.S) for l in b.splitlines()]
    lines = [l for l in blocks if l.startswith("curl ")]
    assert len(lines) >= 3, lines
    # The command-line examples too, with this build's binary.
    commands = [l for l in blocks if l.startswith("infermesh ")]
    assert len(commands) >= 3, commands
    lines += [binary("infermesh") + l[len("infermesh"):] for l in commands]
    for line in lines:
        out = subprocess.run(["bash", "-c", line.replace("localhost:8000", servers["gateway"].http_url)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip(), (line, out.stdout, out.stderr)
        assert '"error"' not in out.stdout, (line, out.stdout)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(client, algorithm):
    x = RNG.rand(2, 784).astype(np.float32)
    i = httpclient.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    result = client.infer("mlp", [i], request_compression_algorithm=algorithm,
                          response_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("output"), reference("mlp", {"input": x})["output"], rtol=1e-5, atol=1e-5)


def test_a_gzip_bomb_stops_at_the_message_cap(tmp_path):
    """A few KiB that inflate past --grpc-max-message-bytes: refused at the cap (429),
    and the server goes on serving."""
    import gzip
    w = Worker("--grpc-max-message-bytes", str(1 << 20))
    try:
        bomb = gzip.compress(b'{"inputs": [' + b" " * (64 << 20) + b"]}")
        assert len(bomb) < 100_000
        status, _, body = raw(w, "POST", "/v2/models/mlp/infer", bomb, {"Content-Encoding": "gzip"})
        assert status == 429 and "inflates to more than" in json.loads(body)["error"], body
        status, _, body = raw(w, "POST", "/v2/models/mlp/infer", b"x", {"Content-Encoding": "br"})
        assert status == 501 and "Content-Encoding" in json.loads(body)["error"], body
        assert httpclient.InferenceServerClient(w.http_url).is_server_ready()
    finally:
        w.stop()


def test_the_openapi_document_is_served_valid_and_covers_every_endpoint(servers):
    from openapi_spec_validator import validate
    gateway = servers["gateway"]
    status, _, body = raw(gateway, "GET", "/v2/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc == json.loads((ROOT / "docs" / "openapi.json").read_text())
    validate(doc)
    for path, item in doc["paths"].items():
        # Model control on a model no worker has: answered, and nothing unloaded.
        model = "nope" if "/repository/" in path else "mlp"
        concrete = path.replace("{model}", model).replace("{version}", "1")
        for method in ("get", "post"):
            if method in item:
                status, _, body = raw(gateway, method.upper(), concrete, b"" if method == "post" else None)
                assert b"no such endpoint" not in body, (method, path, status, body)


def test_a_slow_sender_and_a_body_over_the_budget_are_refused_and_the_server_goes_on():
    import socket
    w = Worker("--grpc-stall-timeout", "1s", "--max-inflight-bytes", "200000")
    try:
        host, port = w.http_url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"{" * 10)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = s.recv(4096)
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 504"), answer
        big = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                      "data": [0.123456789] * 30000}]}).encode()
        assert len(big) > 200000
        status, _, body = raw(w, "POST", "/v2/models/mlp/infer", big)
        assert status == 429 and json.loads(body)["reason"] == "over-budget", body
        assert httpclient.InferenceServerClient(w.http_url).is_server_ready()
    finally:
        w.stop()
