"""Tenants held to their own share and to their current credentials, against a real
gateway with --auth-config: one tenant trickling bodies that fill its byte share while
another is served, streams refused once a key is removed, a model list shrinks or a JWT
expires, and a half-written auth file that keeps the last good policy."""
import hashlib
import json
import queue
import time
import urllib.parse
import urllib.request

import h2.events
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import HOSTILE, Server, Worker, binary
from test_connections import MiB, connect, grpc_status, poll, read_until
from test_trust import call_headers

AUDIENCE, ISSUER, SUBJECT = "infermesh", "https://issuer.test", "system:serviceaccount:apps:streamer"


def key_line(token):
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def tenants(alice_models='["vec_fp32"]', with_alice=True, bob_models='["*"]'):
    alice = f"""  - name: alice
    keys: ["{key_line('tok-alice')}"]
    scopes: [infer]
    models: {alice_models}
    limits: {{requests_per_second: 1000, max_concurrent: 4}}
""" if with_alice else ""
    return f"""tenants:
{alice}  - name: bob
    keys: ["{key_line('tok-bob')}"]
    scopes: [infer]
    models: {bob_models}
    limits: {{}}
  - name: carol
    keys: ["{key_line('tok-carol')}"]
    scopes: [infer, read]
    models: ["*"]
    limits: {{small_calls_per_second: 5}}
  - name: ops
    keys: ["{key_line('tok-ops')}"]
    subjects: ["{SUBJECT}"]
    scopes: [infer, read, admin]
    models: ["*"]
    limits: {{}}
"""


def bearer(who):
    return {"authorization": f"Bearer tok-{who}"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    d = tmp_path_factory.mktemp("tenants")
    key = rsa.generate_private_key(65537, 2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (d / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k", "alg": "RS256", "use": "sig"}]}))
    path = d / "auth.yaml"
    path.write_text(tenants())
    worker = Worker("--model-repository", str(HOSTILE))
    gateway = Server([binary("infermesh-gateway"), "--workers", worker.url, "--worker-refresh", "100ms",
                      "--auth-config", str(path), "--auth-jwks", str(d / "jwks.json"),
                      "--auth-jwt-audience", AUDIENCE, "--auth-jwt-issuer", ISSUER, "--auth-jwt-leeway", "0s",
                      "--max-inflight-bytes", str(8 * MiB), "--grpc-stall-timeout", "6s"], headers=bearer("ops"))

    def token(exp_in):
        now = int(time.time())
        claims = {"sub": SUBJECT, "aud": AUDIENCE, "iss": ISSUER, "iat": now, "nbf": now, "exp": now + exp_in}
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k"})

    yield {"gateway": gateway, "path": path, "token": token}
    assert gateway.stop() == 0
    assert worker.stop() == 0


def vec(n):
    x = grpcclient.InferInput("INPUT0", [1, n], "FP32")
    x.set_data_from_numpy(np.ones((1, n), np.float32))
    return x


def reloads(gateway, result):
    text = urllib.request.urlopen(f"http://{gateway.metrics_url}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("infermesh_config_reloads_total") and 'file="auth-config"' in line
               and f'result="{result}"' in line)


def rewrite(mesh, text, result="ok"):
    """Writes the auth file and waits (bounded) until the gateway counted the reload."""
    before = reloads(mesh["gateway"], result)
    mesh["path"].write_text(text)
    deadline = time.monotonic() + 20
    while reloads(mesh["gateway"], result) <= before:
        assert time.monotonic() < deadline, f"no {result} reload of the auth file counted"
        time.sleep(0.1)


def send_body(s, c, stream_id, data, events, answered=None):
    """Sends `data` on a stream as its window allows; stops early when the stream is
    answered (refused: a gRPC status or a reset, unless `answered(events)` says otherwise).
    Returns whether all of it was sent."""
    sent, deadline = 0, time.monotonic() + 30
    answered = answered or (lambda ev: grpc_status(ev, stream_id) or any(
        isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id for e in ev))
    while sent < len(data):
        if answered(events):
            return False
        assert time.monotonic() < deadline, "no window and no answer"
        window = min(c.local_flow_control_window(stream_id), c.max_outbound_frame_size)
        if window <= 0:
            events += poll(s, c, 1)
            continue
        c.send_data(stream_id, data[sent:sent + window])
        s.sendall(c.data_to_send())
        sent += window
    return True


def test_a_tenant_trickling_its_share_cannot_starve_another(mesh):
    """alice opens three unary bodies that together declare nearly the whole 8 MiB budget,
    sends all but the last KiB of each, then trickles a byte a second: she holds at most
    her share (half), bob's 1 MiB request is served meanwhile, and the trickled body is
    dropped for arriving below --grpc-min-receive-rate."""
    url, gateway = mesh["gateway"].url, mesh["gateway"]
    s, c = connect(url)
    events = []
    sizes = [3 * MiB, 3 * MiB, 2 * MiB - 200]
    accepted = []
    for n, size in enumerate(sizes):
        stream_id = 1 + 2 * n
        c.send_headers(stream_id, call_headers("/inference.GRPCInferenceService/ModelInfer", "tok-alice"))
        body = b"\0" + size.to_bytes(4, "big") + b"\0" * (size - 1024)
        if send_body(s, c, stream_id, body, events):
            accepted.append(stream_id)
    events += read_until(s, c, lambda ev: all(grpc_status(events + ev, 1 + 2 * n) for n in range(1, 3)),
                         timeout=10)
    refused = [grpc_status(events, 1 + 2 * n) for n in range(1, 3)]
    assert any(r and r[0] == 8 and "max_inflight_share" in urllib.parse.unquote(r[1]) for r in refused), refused
    assert 1 in accepted and grpc_status(events, 1) is None, "her first body is held, not refused"

    bob = grpcclient.InferenceServerClient(url)
    out = bob.infer("vec_fp32", [vec(MiB // 4)], headers=bearer("bob"))
    assert out.as_numpy("OUTPUT0").shape == (1, MiB // 4)

    # A byte a second is below 1 KiB/s over the 6 s window: dropped, bytes released.
    deadline = time.monotonic() + 20
    while grpc_status(events, 1) is None:
        assert time.monotonic() < deadline, "the trickled body was never dropped"
        # Flow control is honoured: when the server has not yet opened the window again,
        # nothing arrives, which is slower still.
        if min(c.local_flow_control_window(1), c.outbound_flow_control_window) > 0:
            c.send_data(1, b"\0")
            s.sendall(c.data_to_send())
        events += poll(s, c, 1)
    code, message = grpc_status(events, 1)
    assert code == 4 and "too slowly" in urllib.parse.unquote(message), (code, message)
    s.close()
    assert gateway.proc.poll() is None


def results(client, headers):
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)), headers=headers)
    return q


def until_refused(client, q, model, width=3, within=20):
    """Sends a message every 0.2 s until one is refused; returns that error's text."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            client.async_stream_infer(model, [vec(width)])
        except Exception as e:  # noqa: BLE001 - the stream ended under it
            return str(e)
        result, error = q.get(timeout=10)
        if error is not None:
            return str(error)
        time.sleep(0.2)
    raise AssertionError("the stream was never refused")


def test_an_open_stream_is_ended_when_its_key_is_removed(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    q = results(c, bearer("alice"))
    c.async_stream_infer("vec_fp32", [vec(3)])
    assert q.get(timeout=10)[1] is None
    try:
        rewrite(mesh, tenants(with_alice=False))
        error = until_refused(c, q, "vec_fp32")
        assert "UNAUTHENTICATED" in error or "revoked" in error, error
    finally:
        c.stop_stream()
        rewrite(mesh, tenants())


def test_an_open_stream_follows_a_shrunk_model_list_and_goes_on(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    q = results(c, bearer("bob"))
    c.async_stream_infer("vec_fp32", [vec(3)])
    assert q.get(timeout=10)[1] is None
    try:
        rewrite(mesh, tenants(bob_models='["vec_fp16"]'))
        error = until_refused(c, q, "vec_fp32")
        assert "not open to this credential" in error, error
        # The stream goes on: the next message is answered (refused again, by model).
        c.async_stream_infer("vec_fp32", [vec(3)])
        result, error = q.get(timeout=10)
        assert error is not None and "not open" in str(error), error
    finally:
        c.stop_stream()
        rewrite(mesh, tenants())


def test_an_open_stream_is_ended_when_its_jwt_expires(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    q = results(c, {"authorization": f"Bearer {mesh['token'](3)}"})
    c.async_stream_infer("vec_fp32", [vec(3)])
    assert q.get(timeout=10)[1] is None
    try:
        error = until_refused(c, q, "vec_fp32")
        assert "expired" in error, error
    finally:
        c.stop_stream()


def test_a_half_written_auth_file_keeps_the_last_good_policy(mesh):
    """The file cut in the middle of alice's entry: its prefix parses as YAML, but alice
    lost her `models` and `limits` and bob is gone. Refused as a whole: alice still may not
    call other models, and bob is still served."""
    full = tenants()
    cut = full[:full.index("    models:")]
    try:
        rewrite(mesh, cut, result="error")
        c = grpcclient.InferenceServerClient(mesh["gateway"].url)
        assert c.infer("vec_fp32", [vec(3)], headers=bearer("bob")).as_numpy("OUTPUT0").shape == (1, 3)
        with pytest.raises(Exception) as denied:
            c.infer("vec_fp16", [vec(3)], headers=bearer("alice"))
        assert "PERMISSION_DENIED" in str(denied.value) or "not open" in str(denied.value), denied.value
    finally:
        rewrite(mesh, full)


def test_calls_that_are_not_inference_count_against_their_own_bucket(mesh):
    """carol (5 small calls a second) floods RepositoryIndex and metadata: beyond her
    bucket she is refused RESOURCE_EXHAUSTED at once, and bob's calls are untouched."""
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    codes = []
    for n in range(40):
        try:
            if n % 2:
                c.get_model_repository_index(headers=bearer("carol"))
            else:
                c.get_model_metadata("vec_fp32", headers=bearer("carol"))
            codes.append("OK")
        except Exception as e:  # noqa: BLE001
            assert "small_calls_per_second" in str(e), e
            codes.append("RESOURCE_EXHAUSTED")
    assert codes.count("OK") <= 15 and codes.count("RESOURCE_EXHAUSTED") >= 25, codes
    for _ in range(10):
        assert c.get_model_metadata("vec_fp32", headers=bearer("bob")).name == "vec_fp32"


def test_a_single_models_health_needs_read_while_probes_stay_open(mesh):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    g = mesh["gateway"]
    serving = health_pb2.HealthCheckResponse.SERVING
    for url in (g.url, g.health_url):
        with grpc.insecure_channel(url) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status == serving
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            for name in ("vec_fp32", "no-such-model"):  # the same answer: no existence oracle
                with pytest.raises(grpc.RpcError) as e:
                    stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (url, name, e.value)
    with grpc.insecure_channel(g.url) as ch:
        got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="vec_fp32"), timeout=10,
                                                   metadata=[("authorization", "Bearer tok-carol")])
        assert got.status == serving


def test_a_connection_that_keeps_presenting_bad_tokens_is_closed(mesh):
    """32 refused credentials on one connection close it; a new connection with a good
    token is served."""
    s, c = connect(mesh["gateway"].url)
    ids = [1 + 2 * i for i in range(40)]
    events = []
    for i in ids:
        c.send_headers(i, call_headers("/inference.GRPCInferenceService/ServerLive", "forged"))
        c.send_data(i, b"\0\0\0\0\0", end_stream=True)
        try:
            s.sendall(c.data_to_send())
        except OSError:
            break
        events += poll(s, c, 0.05)
        if "closed" in events or any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            break
    deadline = time.monotonic() + 10
    while "closed" not in events and not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
        assert time.monotonic() < deadline, "the connection stayed open"
        try:
            events += poll(s, c, 0.2)
        except (ConnectionResetError, BrokenPipeError):
            break
    answered = [i for i in ids if grpc_status(events, i)]
    assert all(grpc_status(events, i)[0] == 16 for i in answered)  # UNAUTHENTICATED
    assert len(answered) <= 32, len(answered)
    s.close()
    ok = grpcclient.InferenceServerClient(mesh["gateway"].url)
    assert ok.is_server_live(headers=bearer("bob"))


def test_a_token_holder_cannot_pin_memory_with_metadata_calls(mesh):
    """70 ModelMetadata calls with a valid token, each declaring 4 MiB: refused at their
    prefix (the small calls' cap), so nothing is pinned."""
    from test_connections import rss

    g = mesh["gateway"]
    before = rss(g)
    for _ in range(5):
        s, c = connect(g.url)
        ids = [1 + 2 * i for i in range(14)]
        for i in ids:
            c.send_headers(i, call_headers("/inference.GRPCInferenceService/ModelMetadata", "tok-bob"))
            c.send_data(i, b"\0" + (4 * MiB).to_bytes(4, "big") + b"\0" * 4096)
        s.sendall(c.data_to_send())
        events = read_until(s, c, lambda ev: all(grpc_status(ev, i) for i in ids) or "closed" in ev)
        assert [grpc_status(events, i)[0] for i in ids] == [8] * len(ids)
        s.close()
    assert rss(g) - before < 16 * MiB
