"""The worker's response cache (Triton's response_cache, --cache-config local,size=BYTES)
with real workers and Triton's client: identical requests hit and answer the engine's
bytes, anything that changes the answer misses, new weights under the same version never
see an old answer, the byte bound holds, tenants do not share hits unless the model says
so, and a hit past its deadline is not served."""
import shutil
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import MODELS, Server, Worker, binary
from test_http_admission import two_tenants

CACHED = "response_cache { enable: true }\n"
RNG = np.random.RandomState(7)


def scale_model(path, w, n=4):
    """y = x * w on FP32 [-1, n]: two weights, one signature."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor("w", TensorProto.FLOAT, [n], [float(w)] * n)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def repository(root, big=1 << 14):
    for name, config in [("mlp", CACHED), ("mlp_shared", CACHED + 'parameters { key: "infermesh_response_cache_shared" value { string_value: "true" } }\n'),
                         ("multi_io", CACHED), ("plain", "")]:
        source = "multi_io" if name == "multi_io" else "mlp"
        (root / name / "1").mkdir(parents=True)
        shutil.copy(MODELS / source / "1" / "model.onnx", root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(config)
    scale_model(root / "scale" / "1" / "model.onnx", 2)
    (root / "scale" / "config.pbtxt").write_text(CACHED)
    scale_model(root / "big" / "1" / "model.onnx", 1, n=big)
    (root / "big" / "config.pbtxt").write_text(CACHED)
    return root


def mlp_input(x):
    i = grpcclient.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def stats(client, model):
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return int(s["cache_hit"].get("count", 0)), int(s["cache_miss"].get("count", 0))


def metric(server, name, **labels):
    text = urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = repository(tmp_path_factory.mktemp("cache"))
    w = Worker("--model-repository", str(root), "--model-control-mode", "explicit", "--load-model", "*",
               "--cache-config", "local,size=1048576")
    w.root = root
    yield w
    assert w.stop() == 0


def test_identical_requests_hit_and_answer_the_engine_s_bytes(worker):
    c = worker.client
    x = RNG.rand(1, 784).astype(np.float32)
    engine = c.infer("plain", [mlp_input(x)]).as_numpy("output")
    hits0, misses0 = stats(c, "mlp")
    answers = [c.infer("mlp", [mlp_input(x)], request_id=str(i)) for i in range(5)]
    for i, a in enumerate(answers):
        assert a.as_numpy("output").tobytes() == engine.tobytes()
        assert a.get_response().id == str(i), "a hit answers under the asker's id"
    assert stats(c, "mlp") == (hits0 + 4, misses0 + 1)
    assert metric(worker, "infermesh_cache_hits_total", model="mlp") >= 4
    assert metric(worker, "infermesh_cache_entries") >= 1


def test_anything_that_changes_the_answer_misses_and_is_right(worker):
    c = worker.client
    x = RNG.rand(1, 784).astype(np.float32)
    c.infer("mlp", [mlp_input(x)])
    variants = []
    y = x.copy()
    y.view(np.uint8)[0, 100] ^= 1  # one input byte
    variants.append(y)
    variants.append(np.concatenate([x, x]))  # another shape
    for v in variants:
        hits, misses = stats(c, "mlp")
        got = c.infer("mlp", [mlp_input(v)]).as_numpy("output")
        want = c.infer("plain", [mlp_input(v)]).as_numpy("output")
        assert got.tobytes() == want.tobytes()
        assert stats(c, "mlp") == (hits, misses + 1)
    # Another datatype is the model's error, never a cached answer.
    i = grpcclient.InferInput("input", [1, 784], "FP64")
    i.set_data_from_numpy(x.astype(np.float64))
    with pytest.raises(InferenceServerException) as e:
        c.infer("mlp", [i])
    assert "FP64" in str(e.value)
    # A request parameter that could change the answer is part of the key.
    hits, misses = stats(c, "mlp")
    c.infer("mlp", [mlp_input(x)], parameters={"temperature": "0.5"})
    assert stats(c, "mlp") == (hits, misses + 1)

    # Requested outputs: a subset, then all, each right.
    inputs = []
    for name, shape, dt, value in [("text", [1, 1], "BYTES", np.array([[b"a"]], dtype=object)),
                                   ("x", [1, 4], "FP32", np.arange(4, dtype=np.float32).reshape(1, 4)),
                                   ("k", [1, 1], "INT32", np.array([[41]], dtype=np.int32)),
                                   ("h", [1, 2], "FP16", np.array([[0.5, -1]], dtype=np.float16))]:
        t = grpcclient.InferInput(name, shape, dt)
        t.set_data_from_numpy(value)
        inputs.append(t)
    some = c.infer("multi_io", inputs, outputs=[grpcclient.InferRequestedOutput("k_plus")])
    every = c.infer("multi_io", inputs)
    assert some.as_numpy("y") is None and some.as_numpy("k_plus")[0, 0] == 42
    assert every.as_numpy("y") is not None and every.as_numpy("k_plus")[0, 0] == 42
    assert stats(c, "multi_io") == (0, 2)


def test_new_weights_under_the_same_version_never_see_an_old_answer(worker):
    c = worker.client
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    i = grpcclient.InferInput("x", [1, 4], "FP32")
    i.set_data_from_numpy(x)
    assert c.infer("scale", [i]).as_numpy("y").tolist() == [[2, 4, 6, 8]]
    assert c.infer("scale", [i]).as_numpy("y").tolist() == [[2, 4, 6, 8]]
    assert stats(c, "scale")[0] == 1
    scale_model(worker.root / "scale" / "1" / "model.onnx", 3)
    c.load_model("scale")
    assert c.infer("scale", [i]).as_numpy("y").tolist() == [[3, 6, 9, 12]]
    assert c.infer("scale", [i]).as_numpy("y").tolist() == [[3, 6, 9, 12]]


def test_the_cache_stays_within_its_bytes_under_distinct_large_answers(worker):
    c = worker.client
    for n in range(200):  # 64 KiB answers, 12.5 MiB in all, into a 1 MiB cache
        x = np.full((1, 1 << 14), n, dtype=np.float32)
        i = grpcclient.InferInput("x", [1, 1 << 14], "FP32")
        i.set_data_from_numpy(x)
        assert c.infer("big", [i]).as_numpy("y")[0, 0] == n
        assert metric(worker, "infermesh_cache_bytes") <= 1048576
    assert metric(worker, "infermesh_cache_evictions_total") > 100
    assert metric(worker, "infermesh_cache_limit_bytes") == 1048576


def test_a_hit_past_its_deadline_is_not_served(worker):
    c = worker.client
    x = RNG.rand(1, 784).astype(np.float32)
    c.infer("mlp", [mlp_input(x)])
    with pytest.raises(InferenceServerException) as e:
        c.infer("mlp", [mlp_input(x)], timeout=1)
    assert "DEADLINE_EXCEEDED" in str(e.value.status()), e.value
    assert c.infer("mlp", [mlp_input(x)]).as_numpy("output") is not None


def as_(who):
    return {"authorization": f"Bearer tok-{who}"}


@pytest.mark.parametrize("through", ["worker", "gateway"])
def test_tenants_do_not_share_hits_unless_the_model_says_so(tmp_path, through):
    """With auth on the worker, or on a gateway in front of it: bob's request identical to
    alice's misses (he cannot learn what she asked); his own repeat hits; a model whose
    config shares its cache hits for both."""
    root = repository(tmp_path / "repo")
    auth = ["--auth-config", str(two_tenants(tmp_path / "auth.yaml"))]
    worker = Server([binary("infermesh-worker"), "--model-repository", str(root),
                     "--cache-config", "local,size=1048576", *(auth if through == "worker" else [])],
                    headers=as_("alice"))
    gateway = None
    if through == "gateway":
        gateway = Server([binary("infermesh-gateway"), "--workers", worker.url, "--worker-refresh", "100ms", *auth],
                         headers=as_("alice"))
    front = gateway or worker
    ops = {} if through == "gateway" else as_("alice")
    try:
        c = front.client
        x = RNG.rand(1, 784).astype(np.float32)
        for model, bob_hits in [("mlp", False), ("mlp_shared", True)]:
            c.infer(model, [mlp_input(x)], headers=as_("alice"))
            hits, misses = stats_as(worker, model, ops)
            c.infer(model, [mlp_input(x)], headers=as_("bob"))
            assert stats_as(worker, model, ops) == ((hits + 1, misses) if bob_hits else (hits, misses + 1)), model
            c.infer(model, [mlp_input(x)], headers=as_("bob"))
            assert stats_as(worker, model, ops)[0] == hits + 1 + bob_hits, model
    finally:
        if gateway:
            assert gateway.stop() == 0
        assert worker.stop() == 0


def stats_as(worker, model, headers):
    s = worker.client.get_inference_statistics(model, headers=headers, as_json=True)
    s = s["model_stats"][0]["inference_stats"]
    return int(s["cache_hit"].get("count", 0)), int(s["cache_miss"].get("count", 0))


def test_cache_config_that_cannot_work_stops_the_worker(tmp_path):
    import subprocess
    out = subprocess.run([binary("infermesh-worker"), "--model-repository", str(MODELS), "--grpc-port", "0",
                          "--cache-config", "redis,host=x"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and '"redis" is not available' in out.stderr, out.stderr
