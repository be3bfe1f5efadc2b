"""proto/ for clients in other languages (docs/clients.md): protoc compiles it with the
include root proto/, each language's generated code lands where the file options say, the
messages and methods are Triton's, and Python stubs generated from it call a real mesh."""
import json
import os
import pathlib
import subprocess
import sys

from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from conftest import MODELS, ROOT

PROTOS = ["inference/grpc_service.proto", "inference/model_config.proto"]
VENV_BIN = ROOT / ".venv" / "bin"
LANGUAGE_OPTIONS = {
    "go_package": "github.com/infermesh/infermesh/gen/go/inference;inference",
    "java_package": "io.infermesh.inference",
    "java_multiple_files": True,
    "csharp_namespace": "Infermesh.Inference",
}
# In our copy but not in the schema tritonclient 2.51 carries: fields Triton added later.
NEWER_THAN_TRITONCLIENT = {
    "message .inference.ModelConfig": {"model_metrics"},
    "message .inference.ModelEnsembling": {"max_inflight_requests"},
    "message .inference.ModelMetrics": None,
    "message .inference.ModelMetrics.MetricControl": None,
    "message .inference.ModelMetrics.MetricControl.MetricIdentifier": None,
    "message .inference.ModelMetrics.MetricControl.HistogramOptions": None,
}


def protoc(*args, cwd=ROOT, env=None):
    out = subprocess.run([str(VENV_BIN / "protoc"), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    return out


def debian(package, *flags):
    """A Debian package unpacked into .cache/debian (scripts/debian-local.sh): the protoc
    plugins for Go and C++ without installing them."""
    out = subprocess.run([str(ROOT / "scripts" / "debian-local.sh"), *flags, package], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return pathlib.Path(out.stdout.strip())


def our_files(tmp_path):
    fds = tmp_path / "inference.pb"
    protoc("-I", "proto", "--include_imports", f"--descriptor_set_out={fds}", *(f"proto/{p}" for p in PROTOS))
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(fds.read_bytes()).file}


def shape(file):
    """Every message (its fields), enum (its values) and service (its methods) of a file,
    by full name: what decides the wire and the text format; file options do not."""
    out = {}

    def message(m, scope):
        name = f"{scope}.{m.name}"
        out[f"message {name}"] = {
            f.name: (f.number, f.type, f.label, f.type_name,
                     m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None)
            for f in m.field}
        for n in m.nested_type:
            message(n, name)
        for e in m.enum_type:
            out[f"enum {name}.{e.name}"] = {v.name: v.number for v in e.value}

    scope = f".{file.package}"
    for m in file.message_type:
        message(m, scope)
    for e in file.enum_type:
        out[f"enum {scope}.{e.name}"] = {v.name: v.number for v in e.value}
    for s in file.service:
        out[f"service {scope}.{s.name}"] = {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in s.method}
    return out


def test_every_file_is_package_inference_with_the_language_options(tmp_path):
    files = our_files(tmp_path)
    assert sorted(files) == sorted(PROTOS)
    for name, f in files.items():
        assert f.package == "inference", name
        for option, value in LANGUAGE_OPTIONS.items():
            assert getattr(f.options, option) == value, (name, option)


def test_messages_enums_and_methods_are_tritons(tmp_path):
    """The same names, numbers, types and streaming as the descriptors inside Triton's
    Python client; language options are the only file-level difference."""
    ours = {}
    for f in our_files(tmp_path).values():
        ours.update(shape(f))
    theirs = {}
    for module in (service_pb2, model_config_pb2):
        f = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(f)
        assert f.package == "inference"
        theirs.update(shape(f))

    for name, members in theirs.items():
        assert name in ours, f"{name} is missing"
        for member, spec in members.items():
            assert ours[name].get(member) == spec, f"{name}.{member}: ours {ours[name].get(member)}, Triton's {spec}"
    extra = {name: (set(members) - set(theirs[name]) if name in theirs else None)
             for name, members in ours.items() if name not in theirs or set(members) - set(theirs[name])}
    assert extra == NEWER_THAN_TRITONCLIENT


def test_protoc_generates_cpp_with_grpc_stubs(tmp_path):
    plugins = debian("protobuf-compiler-grpc")
    libs = sorted({str(p.parent) for p in plugins.rglob("*.so*")})
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [*libs, os.environ.get("LD_LIBRARY_PATH")]))}
    protoc("-I", "proto", f"--cpp_out={tmp_path}", f"--grpc_out={tmp_path}",
           f"--plugin=protoc-gen-grpc={plugins / 'usr/bin/grpc_cpp_plugin'}", *(f"proto/{p}" for p in PROTOS),
           env=env)
    assert "namespace inference" in (tmp_path / "inference/model_config.pb.h").read_text()
    assert "class GRPCInferenceService final" in (tmp_path / "inference/grpc_service.grpc.pb.h").read_text()


def test_protoc_generates_go_with_grpc_stubs(tmp_path):
    # Static Go programs: their Debian dependencies (protoc, protobuf headers) are not needed.
    go = debian("protoc-gen-go", "--no-deps") / "usr/bin/protoc-gen-go"
    go_grpc = debian("protoc-gen-go-grpc", "--no-deps") / "usr/bin/protoc-gen-go-grpc"
    protoc("-I", "proto", f"--plugin=protoc-gen-go={go}", f"--plugin=protoc-gen-go-grpc={go_grpc}",
           f"--go_out={tmp_path}", "--go_opt=paths=source_relative",
           f"--go-grpc_out={tmp_path}", "--go-grpc_opt=paths=source_relative", *(f"proto/{p}" for p in PROTOS))
    for name in ("grpc_service.pb.go", "model_config.pb.go", "grpc_service_grpc.pb.go"):
        assert "\npackage inference\n" in (tmp_path / "inference" / name).read_text(), name
    assert "type GRPCInferenceServiceClient interface" in (tmp_path / "inference/grpc_service_grpc.pb.go").read_text()


def test_protoc_generates_java_and_csharp_in_their_packages(tmp_path):
    for lang in ("java", "csharp"):
        (tmp_path / lang).mkdir()
    protoc("-I", "proto", f"--java_out={tmp_path / 'java'}", f"--csharp_out={tmp_path / 'csharp'}",
           *(f"proto/{p}" for p in PROTOS))
    # java_multiple_files: one class per message, in io.infermesh.inference.
    request = tmp_path / "java/io/infermesh/inference/ModelInferRequest.java"
    assert "package io.infermesh.inference;" in request.read_text()
    for name in ("GrpcService.cs", "ModelConfig.cs"):
        assert "namespace Infermesh.Inference" in (tmp_path / "csharp" / name).read_text()


STUB_CLIENT = """
import json, sys
import grpc
from inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc
import numpy as np

url, example = sys.argv[1], sys.argv[2]
row = np.array(json.load(open(example)), dtype=np.float32)
stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))
req = pb.ModelInferRequest(model_name="digits", raw_input_contents=[row.tobytes()])
req.inputs.add(name="input", datatype="FP32", shape=list(row.shape))
resp = stub.ModelInfer(req, timeout=10)
names = [o.name for o in resp.outputs]
print(int(np.frombuffer(resp.raw_output_contents[names.index("label")], dtype="<i8")[0]))
"""


def test_python_stubs_from_grpc_tools_call_the_gateway(mesh, tmp_path):
    gateway, _ = mesh
    out = tmp_path / "gen"
    out.mkdir()
    gen = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={out}",
                          f"--grpc_python_out={out}", *(f"proto/{p}" for p in PROTOS)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    # Its own process: tritonclient, imported here, registers the same message names
    # (package inference) in protobuf's default pool, which refuses a second definition.
    (tmp_path / "client.py").write_text(STUB_CLIENT)
    run = subprocess.run([sys.executable, str(tmp_path / "client.py"), gateway.url,
                          str(MODELS / "digits/example.json")],
                         cwd=out, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(out)})
    assert run.returncode == 0, run.stderr
    samples = json.loads((MODELS / "digits/samples.json").read_text())
    assert int(run.stdout) == samples["labels"][0]
