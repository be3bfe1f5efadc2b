"""The HTTP door under the gRPC door's admission rules: a body trickled below the minimum
rate is dropped, a tenant's bodies count against its own share from the first byte (so
one tenant filling its share cannot starve another), and the optional deadline header."""
import json
import time
import urllib.error
import urllib.request

import h2.events
import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import HOSTILE, Server, Worker, binary
from test_http import servers  # noqa: F401 (a fixture: a worker and a gateway in front of it)
from test_connections import connect, poll
from test_tenants import bearer, key_line, send_body

MiB = 1 << 20


def post(server, path, body, headers=None):
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method="POST",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MLP = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                              "data": [0.5] * 784}]}).encode()


def test_a_body_trickled_below_the_minimum_rate_is_dropped():
    """Ten bytes every 0.3 s never stall for the whole second, but stay below
    --grpc-min-receive-rate: the body is dropped (504) and the server goes on."""
    import socket
    w = Worker("--grpc-stall-timeout", "1s", "--grpc-min-receive-rate", "1000")
    try:
        host, port = w.http_url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            answer, deadline = b"", time.monotonic() + 30
            s.settimeout(0.3)
            while b"\r\n\r\n" not in answer:
                assert time.monotonic() < deadline, "the trickled body was never dropped"
                try:
                    s.sendall(b" " * 10)
                    chunk = s.recv(4096)
                except socket.timeout:
                    continue
                assert chunk, answer
                answer += chunk
            while not answer.endswith(b"}"):
                answer += s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 504"), answer
        assert b"too slowly" in answer and b"--grpc-min-receive-rate" in answer, answer
        assert post(w, "/v2/models/mlp/infer", MLP)[0] == 200
    finally:
        w.stop()


@pytest.mark.parametrize("which", ["worker", "gateway"])
def test_the_deadline_header(servers, which):
    """grpc-timeout as gRPC writes it: an expired one answers 504 with the deadline reason,
    a generous one is served, and one that does not parse is refused naming the header."""
    server = servers[which]
    status, body = post(server, "/v2/models/mlp/infer", MLP, {"grpc-timeout": "1n"})
    assert status == 504 and body["reason"] == "deadline", body
    status, body = post(server, "/v2/models/mlp/infer", MLP, {"grpc-timeout": "30S"})
    assert status == 200 and body["outputs"][0]["name"] == "output", body
    status, body = post(server, "/v2/models/mlp/infer", MLP, {"grpc-timeout": "soon"})
    assert status == 400 and "grpc-timeout" in body["error"] and "soon" in body["error"], body


def http2_post(c, s, stream_id, path, token, size):
    c.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", path),
                               ("authorization", f"Bearer {token}"), ("content-length", str(size))])
    s.sendall(c.data_to_send())


def answered(events, stream_id):
    for e in events:
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id:
            return int(dict(e.headers)[":status"])
        if isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id:
            return "reset"
    return None


def two_tenants(path):
    """An auth file with tenants alice and bob (keys tok-alice, tok-bob), both allowed
    every model with the infer and read scopes."""
    path.write_text("tenants:\n" + "".join(f"""  - name: {who}
    keys: ["{key_line('tok-' + who)}"]
    scopes: [infer, read]
    models: ["*"]
    limits: {{}}
""" for who in ("alice", "bob")))
    return path


def test_a_tenant_filling_its_share_over_http_cannot_starve_another(tmp_path):
    """alice opens three HTTP/2 requests declaring nearly the whole 8 MiB budget and sends
    all but the last KiB of each: her bodies count against her share (half) as they
    arrive, so the later ones are refused (429, naming the share) while her first is held,
    and bob's 1 MiB request over HTTP is served meanwhile. A request without credentials
    is refused before its body is read; probes need none."""
    path = two_tenants(tmp_path / "auth.yaml")
    worker = Worker("--model-repository", str(HOSTILE))
    gateway = Server([binary("infermesh-gateway"), "--workers", worker.url, "--auth-config", str(path),
                      "--max-inflight-bytes", str(8 * MiB), "--grpc-stall-timeout", "20s"], headers=bearer("bob"))
    try:
        s, c = connect(gateway.http_url)
        events = []
        sizes = [3 * MiB, 3 * MiB, 2 * MiB - 200]
        for n, size in enumerate(sizes):
            stream_id = 1 + 2 * n
            http2_post(c, s, stream_id, "/v2/models/vec_fp32/infer", "tok-alice", size)
            send_body(s, c, stream_id, b" " * (size - 1024), events,
                      answered=lambda ev, i=stream_id: answered(ev, i))
        events += poll(s, c, 1)
        later = [answered(events, 1 + 2 * n) for n in (1, 2)]
        assert 429 in later, (later, events)
        bodies = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        assert b"max_inflight_share" in bodies, bodies
        assert answered(events, 1) is None, "her first body is held, not refused"

        bob = httpclient.InferenceServerClient(gateway.http_url)
        x = httpclient.InferInput("INPUT0", [1, MiB // 4], "FP32")
        x.set_data_from_numpy(np.ones((1, MiB // 4), np.float32), binary_data=True)
        out = bob.infer("vec_fp32", [x], headers=bearer("bob"))
        assert out.as_numpy("OUTPUT0").shape == (1, MiB // 4)

        status, body = post(gateway, "/v2/models/vec_fp32/infer", b"{}" * 1000)
        assert status == 401 and "authorization" in body["error"], body
        # Probes carry no credentials: server health is open, everything else is not. The
        # gateway's health follows its pool's refreshes, so readiness may say so a moment
        # after ServerReady did: asked again until then (bounded).
        for probe in ("/v2/health/live", "/v2/health/ready"):
            deadline = time.monotonic() + 30
            while True:
                try:
                    status = urllib.request.urlopen(f"http://{gateway.http_url}{probe}", timeout=10).status
                except urllib.error.HTTPError as e:
                    status = e.code
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == 200, (probe, status)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{gateway.http_url}/v2", timeout=10)
        assert e.value.code == 401
        s.close()
        assert gateway.proc.poll() is None
    finally:
        gateway.stop()
        worker.stop()
