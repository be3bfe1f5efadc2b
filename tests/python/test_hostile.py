"""Hostile requests against real worker and gateway processes (loopback, bounded): each
case once took a process down, hung, or answered with the wrong code. Every one must now
get the right status with a short message, and the fleet must keep serving."""
import struct
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import HOSTILE, Gateway, Worker

MAX_MESSAGE = 4096
SC = grpc.StatusCode


def stub(server):
    channel = grpc.insecure_channel(server.url, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(model, inputs, raw, params=None, version=""):
    """A ModelInferRequest with raw contents: inputs are (name, datatype, shape)."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, dt, shape in inputs:
        t = req.inputs.add()
        t.name, t.datatype = name, dt
        t.shape.extend(shape)
    req.raw_input_contents.extend(raw)
    for k, v in (params or {}).items():
        if isinstance(v, bool):
            req.parameters[k].bool_param = v
        else:
            req.parameters[k].string_param = v
    return req


def call(server, req, timeout=30):
    """(code, message) of one ModelInfer."""
    channel, s = stub(server)
    try:
        s.ModelInfer(req, timeout=timeout)
        return SC.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    finally:
        channel.close()


def bytes_elements(*items):
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


def assert_alive(*servers):
    for s in servers:
        assert s.proc.poll() is None, f"{s.url} exited with {s.proc.returncode}"
        assert s.client.is_server_ready()


def good(server):
    x = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3]], np.float32))
    out = server.client.infer("vec_fp32", [x]).as_numpy("OUTPUT0")
    assert out.tolist() == [[1, 2, 3]]


@pytest.mark.parametrize("model,shape,raw", [
    # A 42-byte request declaring a billion BYTES elements once made the worker allocate
    # 32 GB and abort; 2^60 panicked with "capacity overflow".
    ("text", [1_000_000_000], [b"\x01\x00\x00\x00a"]),
    ("text", [2**60], [b"\x01\x00\x00\x00a"]),
    ("var_dims", [1_000_000_000], None),
])
def test_a_declared_shape_never_sizes_an_allocation(fleet, model, shape, raw):
    gateway, workers = fleet
    if model == "var_dims":
        inputs = [("text", "BYTES", shape), ("x", "FP32", [1, 1]), ("h", "FP16", [1])]
        raw = [b"\x01\x00\x00\x00a", b"\0" * 4, b"\0" * 2]
    else:
        inputs = [("INPUT0", "BYTES", shape)]
    for server in [workers[0], gateway]:
        code, msg = call(server, raw_request(model, inputs, raw))
        assert code == SC.INVALID_ARGUMENT, (code, msg)
        assert "input 'INPUT0'" in msg or "input 'text'" in msg, msg
    assert_alive(gateway, *workers)
    good(gateway)


@pytest.mark.parametrize("model,inputs,raw", [
    # count × 4 wrapped to 0 in release builds and was answered OK with a nonsense shape.
    ("matrix_fp32", [("INPUT0", "FP32", [2**62, 1]), ("INPUT1", "INT32", [0]), ("INPUT2", "UINT8", [2])],
     [b"", b"", b"\1\2"]),
    ("var_dims", [("text", "BYTES", [1]), ("x", "FP32", [2**62, 1]), ("h", "FP16", [1])],
     [bytes_elements(b"a"), b"", b"\0\0"]),
    ("vec_fp16", [("INPUT0", "FP16", [2**63 - 1])], [b""]),
    ("matrix_fp32", [("INPUT0", "FP32", [0, 2**40]), ("INPUT1", "INT32", [0]), ("INPUT2", "UINT8", [2])],
     [b"", b"", b"\1\2"]),
])
def test_shape_arithmetic_never_wraps(fleet, model, inputs, raw):
    gateway, workers = fleet
    for server in [workers[0], gateway]:
        code, msg = call(server, raw_request(model, inputs, raw))
        assert code == SC.INVALID_ARGUMENT, (code, msg)
        assert len(msg) < MAX_MESSAGE
    assert_alive(gateway, *workers)


def test_an_echoed_name_cannot_break_the_gateways_connections(fleet):
    """A 64 KiB input name in a request over 256 KiB (sent to the worker as a unary call)
    was echoed into grpc-message, over the gateway's header limit: the worker connections
    broke and 62% of concurrent good traffic failed."""
    gateway, workers = fleet
    failures, stop = [], threading.Event()

    def good_traffic():
        c = grpcclient.InferenceServerClient(gateway.url)
        x = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        while not stop.is_set():
            try:
                c.infer("vec_fp32", [x])
            except Exception as e:  # noqa: BLE001 - any failure counts
                failures.append(str(e))
        c.close()

    threads = [threading.Thread(target=good_traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        big = b"\0" * (300 * 1024)
        for name, dt in [("N" * 65536, "FP32"), ("INPUT0", "D" * 65536)]:
            for _ in range(5):
                req = raw_request("vec_fp32", [(name, dt, [1, len(big) // 4])], [big])
                code, msg = call(gateway, req)
                assert code == SC.INVALID_ARGUMENT, (code, msg[:200])
                assert len(msg) < MAX_MESSAGE and "(65536 bytes)" in msg, msg[:300]
        # A 1 MB model name comes back cut short too.
        code, msg = call(gateway, raw_request("m" * (1 << 20), [("x", "FP32", [1])], [b"\0" * 4]))
        assert code == SC.NOT_FOUND and len(msg) < MAX_MESSAGE, (code, len(msg))
        assert "(1048576 bytes)" in msg
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == [], failures[:3]
    assert_alive(gateway, *workers)


def test_mesh_parameters_are_refused_at_the_gateway(fleet):
    """A unary request carrying infermesh_cancel was forwarded blindly and never answered."""
    gateway, workers = fleet
    req = raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4], {"infermesh_cancel": True})
    start = time.monotonic()
    code, msg = call(gateway, req, timeout=20)
    assert code == SC.INVALID_ARGUMENT and "infermesh_cancel" in msg, (code, msg)
    assert time.monotonic() - start < 10
    code, msg = call(gateway, raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4],
                                          {"infermesh_status_code": "0"}))
    assert code == SC.INVALID_ARGUMENT and "infermesh_status_code" in msg
    # The one a client may set still works, and a worker keeps infermesh_cancel for
    # direct stream clients (tested with the stream protocol).
    assert call(gateway, raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4],
                                     {"infermesh_unordered": True}))[0] == SC.OK


def test_mesh_parameters_in_a_stream_fail_that_message_only(fleet):
    gateway, _ = fleet
    channel, s = stub(gateway)
    ok = raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4])
    bad = raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4], {"infermesh_cancel": True})
    msgs = []
    for i, r in enumerate([ok, bad, ok]):
        r = type(r).FromString(r.SerializeToString())
        r.id = str(i)
        msgs.append(r)
    try:
        answers = list(s.ModelStreamInfer(iter(msgs), timeout=30))
    finally:
        channel.close()
    assert [a.infer_response.id for a in answers] == ["0", "1", "2"]
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    assert "infermesh_cancel" in answers[1].error_message
    assert answers[1].infer_response.parameters["infermesh_status_code"].int64_param == 3


def test_strings_are_checked_before_they_join_a_batch(fleet):
    """A NUL byte in a string for an ONNX model reached ONNX Runtime: INTERNAL, and the
    requests batched with it failed too."""
    gateway, workers = fleet
    for item, what in [(b"a\0b", "NUL"), (b"\xff\xfe", "UTF-8")]:
        req = raw_request("var_dims", [("text", "BYTES", [2]), ("x", "FP32", [1, 1]), ("h", "FP16", [1])],
                          [bytes_elements(b"ok", item), b"\0" * 4, b"\0\0"])
        for server in [workers[0], gateway]:
            code, msg = call(server, req)
            assert code == SC.INVALID_ARGUMENT, (code, msg)
            assert "input 'text': BYTES element 1" in msg and what in msg, msg
    # The identity backend takes any bytes: strings rules are the engine's, not the protocol's.
    req = raw_request("text", [("INPUT0", "BYTES", [1])], [bytes_elements(b"a\0\xff")])
    assert call(gateway, req)[0] == SC.OK


def test_undecodable_protobuf_is_invalid_argument(fleet):
    gateway, workers = fleet
    for server in [workers[0], gateway]:
        channel = grpc.insecure_channel(server.url)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=None, response_deserializer=None)
        for junk in [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"]:
            with pytest.raises(grpc.RpcError) as e:
                infer(junk, timeout=10)
            assert e.value.code() == SC.INVALID_ARGUMENT, (junk, e.value.code(), e.value.details())
            assert "ModelInferRequest" in e.value.details()
        channel.close()


def test_unknown_version_and_missing_inputs(fleet):
    gateway, workers = fleet
    req = raw_request("vec_fp32", [("INPUT0", "FP32", [1, 1])], [b"\0" * 4], version="7")
    for server in [workers[0], gateway]:
        code, msg = call(server, req)
        assert code == SC.NOT_FOUND and "no version 7" in msg, (server.url, code, msg)
    req = raw_request("matrix_fp32", [("INPUT2", "UINT8", [2])], [b"\0\0"])
    for server in [workers[0], gateway]:
        code, msg = call(server, req)
        assert code == SC.INVALID_ARGUMENT, (code, msg)
        assert "missing inputs 'INPUT0'" in msg and "'INPUT1'" in msg, msg


@pytest.fixture
def control_repo(tmp_path):
    repo = tmp_path / "repo"
    for name in ["a", "b", "c"]:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text((HOSTILE / "vec_fp32" / "config.pbtxt").read_text())
    outside = tmp_path / "outside" / "evil"
    (outside / "1").mkdir(parents=True)
    (outside / "config.pbtxt").write_text((HOSTILE / "vec_fp32" / "config.pbtxt").read_text())
    (repo / "escape").symlink_to(outside)
    (repo / "not_a_dir").write_text("x")
    return repo


def test_model_control_stays_inside_the_repository(control_repo):
    w = Worker("--model-repository", str(control_repo), "--model-control-mode", "explicit",
               "--load-model", "a", "--max-models", "2")
    g = Gateway(w, extra=("--model-control-mode", "explicit"))
    try:
        c = w.client
        for server in [w, g]:
            for name in ["../outside/evil", str(control_repo.parent / "outside" / "evil"), "/etc",
                         "/nonexistent", "./a", "././a", "", ".", "..", "a/1", "a" * 200]:
                with pytest.raises(Exception) as e:
                    server.client.load_model(name)
                assert "StatusCode.INVALID_ARGUMENT" in str(e.value), (name, str(e.value)[:300])
        # Missing, a symlink out of the repository and a plain file answer alike.
        answers = set()
        for name in ["nosuch", "escape", "not_a_dir"]:
            with pytest.raises(Exception) as e:
                c.load_model(name)
            assert "StatusCode.NOT_FOUND" in str(e.value), str(e.value)
            answers.add(str(e.value).replace(name, "NAME"))
        assert len(answers) == 1, answers
        # Triton's inline config and files are not silently ignored.
        for params in [{"config": '{"max_batch_size": 1}'}, {"file:1/model.onnx": b"\0"}]:
            for server in [w, g]:
                with pytest.raises(Exception) as e:
                    if "config" in params:
                        server.client.load_model("b", config=params["config"])
                    else:
                        server.client.load_model("b", files=params)
                assert "StatusCode.UNIMPLEMENTED" in str(e.value), str(e.value)
        # --max-models 2: a is loaded; b fits; c does not; reloading b is fine.
        c.load_model("b")
        c.load_model("b")
        with pytest.raises(Exception) as e:
            c.load_model("c")
        assert "StatusCode.RESOURCE_EXHAUSTED" in str(e.value) and "--max-models 2" in str(e.value)
        assert sorted(m.name for m in c.get_model_repository_index().models
                      if m.state == "READY") == ["a", "b"]
        # Through all of it, health never turned NOT_SERVING.
        assert c.is_server_ready()
    finally:
        assert g.stop() == 0
        assert w.stop() == 0


def trigger_repo(tmp_path, model, trigger, byte):
    """A repository with one identity UINT8 [-1] model whose `trigger` parameter fires on
    inputs starting with `byte`."""
    repo = tmp_path / "repo"
    (repo / model / "1").mkdir(parents=True)
    (repo / model / "config.pbtxt").write_text(f"""backend: "identity"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_UINT8 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_UINT8 dims: [ -1 ] }} ]
parameters {{ key: "{trigger}" value: {{ string_value: "{byte}" }} }}
""")
    return repo


def test_a_query_of_death_breaks_at_most_two_workers(tmp_path):
    """The identity backend's crash trigger aborts the worker process, as a real query of
    death would: the gateway retries it once, then refuses its fingerprint."""
    repo = trigger_repo(tmp_path, "crashy", "crash_on_first_byte", 255)
    workers = [Worker("--model-repository", str(repo)) for _ in range(3)]
    g = Gateway(*workers)
    try:
        poison = raw_request("crashy", [("INPUT0", "UINT8", [3])], [b"\xff\x01\x02"])
        code, msg = call(g, poison)
        assert code == SC.UNAVAILABLE and "broke 2 workers" in msg, (code, msg)
        # Give an aborting process its moment to be reaped, bounded.
        dead, deadline = [], time.monotonic() + 30
        while len(dead) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = [w for w in workers if w.proc.poll() is not None]
        assert len(dead) == 2, [w.proc.poll() for w in workers]
        alive = [w for w in workers if w.proc.poll() is None]
        # The same request again is refused at the gateway: the last worker survives.
        for _ in range(3):
            code, msg = call(g, poison)
            assert code == SC.UNAVAILABLE and "refused" in msg, (code, msg)
        # On a stream too, with the reason that says never retry it (not model-not-ready).
        channel, s = stub(g)
        answers = list(s.ModelStreamInfer(iter([poison]), timeout=30))
        channel.close()
        params = answers[0].infer_response.parameters
        assert answers[0].error_message and params["infermesh_reason"].string_param == "quarantined", answers
        assert alive[0].proc.poll() is None
        # Other requests keep being served by it.
        ok = raw_request("crashy", [("INPUT0", "UINT8", [3])], [b"\x01\x02\x03"])
        deadline = time.monotonic() + 30
        while (code := call(g, ok)[0]) != SC.OK and time.monotonic() < deadline:
            time.sleep(0.05)
        assert code == SC.OK
        port = g.metrics_url.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert "infermesh_gateway_poison_total 1" in r.read().decode()
        log = "".join(g.log)
        assert log.count("identical requests are refused") == 1, "logged once"
    finally:
        assert g.stop() == 0
        for w in workers:
            if w.proc.poll() is None:
                assert w.stop() == 0


@pytest.mark.parametrize("way", ["unary", "stream"])
def test_a_request_that_broke_the_only_worker_is_unavailable_worker_unreachable(tmp_path, way):
    """The worker's process dies under the request and no other worker is left: the client
    is told UNAVAILABLE `worker-unreachable` (safe to retry later), not the transport's
    UNKNOWN or a reason that blames the model."""
    repo = trigger_repo(tmp_path, "crashy", "crash_on_first_byte", 255)
    w = Worker("--model-repository", str(repo))
    g = Gateway(w)
    try:
        poison = raw_request("crashy", [("INPUT0", "UINT8", [3])], [b"\xff\x01\x02"])
        channel, s = stub(g)
        if way == "unary":
            with pytest.raises(grpc.RpcError) as e:
                s.ModelInfer(poison, timeout=30)
            assert e.value.code() == SC.UNAVAILABLE, e.value
            assert "unreachable" in e.value.details(), e.value.details()
            details = dict(e.value.trailing_metadata()).get("grpc-status-details-bin", b"")
            assert b"worker-unreachable" in details, details
        else:
            answers = list(s.ModelStreamInfer(iter([poison]), timeout=30))
            params = answers[0].infer_response.parameters
            assert answers[0].error_message, answers
            assert params["infermesh_reason"].string_param == "worker-unreachable", answers
            assert params["infermesh_status_code"].int64_param == SC.UNAVAILABLE.value[0]
        channel.close()
        assert w.proc.wait(timeout=30) != 0, "the trigger aborts the worker"
    finally:
        assert g.stop() == 0


def test_a_panic_fails_only_its_own_request(tmp_path):
    repo = trigger_repo(tmp_path, "panicky", "panic_on_first_byte", 254)
    w = Worker("--model-repository", str(repo))
    try:
        channel, s = stub(w)
        good_req = raw_request("panicky", [("INPUT0", "UINT8", [2])], [b"\x01\x02"])
        bad_req = raw_request("panicky", [("INPUT0", "UINT8", [2])], [b"\xfe\x02"])
        # On one connection: the panicking call among good ones, unary and in a stream.
        calls = [s.ModelInfer.future(good_req, timeout=30) for _ in range(10)]
        bad = s.ModelInfer.future(bad_req, timeout=30)
        calls += [s.ModelInfer.future(good_req, timeout=30) for _ in range(10)]
        with pytest.raises(grpc.RpcError) as e:
            bad.result()
        assert e.value.code() == SC.INTERNAL and "panic" in e.value.details()
        assert all(c.result().raw_output_contents[0] == b"\x01\x02" for c in calls)
        msgs = []
        for i, r in enumerate([good_req, bad_req, good_req]):
            m = type(r).FromString(r.SerializeToString())
            m.id = str(i)
            msgs.append(m)
        answers = list(s.ModelStreamInfer(iter(msgs), timeout=30))
        assert [bool(a.error_message) for a in answers] == [False, True, False]
        assert answers[1].infer_response.parameters["infermesh_status_code"].int64_param == 13
        channel.close()
        # The instance lives on; each panic is one log line and one count.
        assert call(w, good_req)[0] == SC.OK
        port = w.metrics_url.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert "infermesh_panics_total 2" in r.read().decode()
        panic_lines = [line for line in w.log if "panic" in line and "ERROR" in line]
        assert len(panic_lines) == 2, panic_lines
        assert not any("stack backtrace" in line or "RUST_BACKTRACE" in line for line in w.log)
    finally:
        assert w.stop() == 0
