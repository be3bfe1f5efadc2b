"""Shadow traffic and the guard through a real gateway in front of real workers: the bundled
MLP, an identical copy, a copy with a known constant added to its output and a copy whose
output has another name, all made here from the bundled model; the identity backend for
injected failures and a slow shadow target."""
import concurrent.futures
import pathlib
import queue
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import helper, numpy_helper

from conftest import MODELS, Gateway, Worker
from test_metrics import scrape, total
from test_traffic import IDENTITY, repo, routes_json, version_of, wait_for

SHIFT = 0.5
ONNX_CONFIG = 'platform: "onnxruntime_onnx"\nversion_policy: { all: { } }\n'


def shifted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with SHIFT added to its output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    last = m.graph.node[-1]
    last.output[0] = "unshifted"
    m.graph.initializer.append(numpy_helper.from_array(np.array([SHIFT], np.float32), "shift"))
    m.graph.node.append(helper.make_node("Add", ["unshifted", "shift"], ["output"]))
    return m


def renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its output called `logits`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node[-1].output[0] = "logits"
    m.graph.output[0].name = "logits"
    return m


def onnx_repo(root: pathlib.Path) -> pathlib.Path:
    """mlp: version 1 the bundled model, 2 an identical copy, 3 shifted; mlp_renamed: 1."""
    original = onnx.load(str(MODELS / "mlp" / "1" / "model.onnx"))
    for v, model in [(1, original), (2, original), (3, shifted(original))]:
        (root / "mlp" / str(v)).mkdir(parents=True)
        onnx.save(model, str(root / "mlp" / str(v) / "model.onnx"))
    (root / "mlp" / "config.pbtxt").write_text(ONNX_CONFIG)
    (root / "mlp_renamed" / "1").mkdir(parents=True)
    onnx.save(renamed(original), str(root / "mlp_renamed" / "1" / "model.onnx"))
    return root


def mlp_input(rng):
    data = rng.rand(2, 784).astype(np.float32)
    i = grpcclient.InferInput("input", [2, 784], "FP32")
    i.set_data_from_numpy(data)
    return i, data


def shadow_view(gateway, model="mlp"):
    return next(m for m in routes_json(gateway)["models"] if m["model"] == model)


def shadow_of(gateway, model="mlp"):
    return shadow_view(gateway, model).get("shadow")


def settled(gateway, n, model="mlp"):
    """Waits until `n` shadow copies came to a result."""
    def done():
        s = shadow_of(gateway, model)
        return s is not None and s["in_flight"] == 0 and s["agree"] + s["disagree"] + s["error"] + s["dropped"] >= n
    wait_for(f"{n} shadow results", done)
    return shadow_of(gateway, model)


@pytest.fixture(scope="module")
def onnx_mesh(tmp_path_factory):
    root = onnx_repo(tmp_path_factory.mktemp("repo"))
    workers = [Worker("--model-repository", str(root), "--intra-op-threads", "1") for _ in range(2)]
    routes = tmp_path_factory.mktemp("routes") / "routes.yaml"
    routes.write_text('models:\n  mlp:\n    split: {"1": 1}\n    shadow: {target: {version: 2}}\n')
    gateway = Gateway(*workers, extra=("--routes", str(routes)))
    reference = ort.InferenceSession(str(MODELS / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    yield gateway, routes, reference
    gateway.stop()
    for w in workers:
        w.stop()


def reload(gateway, routes, text):
    before = routes_json(gateway)["reloads"]
    routes.write_text(text)
    wait_for("the routing file reloaded", lambda: routes_json(gateway)["reloads"] > before)


def answer_from_the_primary(gateway, reference, rng, n):
    """n requests; every answer is version 1's, equal to onnxruntime's on the same input."""
    for _ in range(n):
        i, data = mlp_input(rng)
        r = gateway.client.infer("mlp", [i])
        assert r.get_response().model_version == "1"
        np.testing.assert_allclose(r.as_numpy("output"), reference.run(None, {"input": data})[0], rtol=1e-5, atol=1e-5)


def test_a_shadow_of_an_identical_version_agrees_every_time(onnx_mesh):
    gateway, _, reference = onnx_mesh
    answer_from_the_primary(gateway, reference, np.random.RandomState(0), 50)
    s = settled(gateway, 50)
    assert s["target"] == "mlp:2"
    assert (s["agree"], s["disagree"], s["error"], s["dropped"]) == (50, 0, 0, 0), s
    assert s["agreement"] == 1.0 and s["worst_abs_error"] == 0.0
    assert s["argmax_rows"] == 100 and s["argmax_changed"] == 0, s
    m = scrape(gateway)
    assert total(m, "infermesh_gateway_shadow", "infermesh_gateway_shadow_total", model="mlp", target="mlp:2", result="agree") == 50
    assert total(m, "infermesh_gateway_shadow_cosine_similarity", "infermesh_gateway_shadow_cosine_similarity_count",
                 model="mlp", target="mlp:2") == 50


def test_stream_messages_are_shadowed_one_by_one(onnx_mesh):
    gateway, _, reference = onnx_mesh
    before = settled(gateway, 0)["agree"]
    answers = queue.Queue()
    c = grpcclient.InferenceServerClient(gateway.url)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    rng = np.random.RandomState(4)
    sent = []
    try:
        for n in range(30):
            i, data = mlp_input(rng)
            sent.append(data)
            c.async_stream_infer("mlp", [i], request_id=str(n))
        results = [answers.get(timeout=60) for _ in range(30)]
    finally:
        c.stop_stream()
        c.close()
    assert all(e is None for _, e in results), [e for _, e in results if e][:3]
    for r, _ in results:
        data = sent[int(r.get_response().id)]
        np.testing.assert_allclose(r.as_numpy("output"), reference.run(None, {"input": data})[0], rtol=1e-5, atol=1e-5)
    s = settled(gateway, before + 30)
    assert (s["agree"], s["disagree"], s["error"]) == (before + 30, 0, 0), s


def test_a_shadow_of_a_shifted_version_disagrees_by_the_shift(onnx_mesh):
    gateway, routes, reference = onnx_mesh
    reload(gateway, routes, 'models:\n  mlp:\n    split: {"1": 1}\n'
                            '    shadow: {target: {version: "3"}, compare: {atol: 1.0e-4, rtol: 1.0e-3}}\n')
    answer_from_the_primary(gateway, reference, np.random.RandomState(1), 40)
    s = settled(gateway, 40)
    assert s["target"] == "mlp:3"
    assert (s["agree"], s["disagree"], s["error"]) == (0, 40, 0), s
    assert abs(s["worst_abs_error"] - SHIFT) < 1e-5, s
    # Adding a constant to every logit never changes the argmax.
    assert s["argmax_changed"] == 0 and s["argmax_rows"] == 80, s
    m = scrape(gateway)
    assert total(m, "infermesh_gateway_shadow", "infermesh_gateway_shadow_total", model="mlp", target="mlp:3", result="disagree") == 40
    # Every max abs error falls in the (0.1, 1] bucket.
    assert total(m, "infermesh_gateway_shadow_max_abs_error", "infermesh_gateway_shadow_max_abs_error_bucket",
                 model="mlp", target="mlp:3", le="0.1") == 0
    assert total(m, "infermesh_gateway_shadow_max_abs_error", "infermesh_gateway_shadow_max_abs_error_bucket",
                 model="mlp", target="mlp:3", le="1.0") == 40
    assert any("shadow answer disagrees" in line and "0.5" in line for line in gateway.log), "a disagreement is logged"


def test_a_shadow_model_with_another_output_name_counts_errors(onnx_mesh):
    gateway, routes, reference = onnx_mesh
    reload(gateway, routes, 'models:\n  mlp:\n    split: {"1": 1}\n    shadow: {target: {model: mlp_renamed}, percent: 50}\n')
    answer_from_the_primary(gateway, reference, np.random.RandomState(2), 20)
    s = settled(gateway, 10)
    assert s["target"] == "mlp_renamed" and s["percent"] == 50.0
    assert (s["agree"], s["disagree"], s["error"]) == (0, 0, 10), s
    assert "'logits'" in s["last_error"], s


def test_the_guard_takes_a_disagreeing_version_out_of_the_split(onnx_mesh):
    gateway, routes, reference = onnx_mesh
    reload(gateway, routes, 'models:\n  mlp:\n    split: {"1": 9, "3": 1}\n'
                            '    shadow: {target: {version: 3}}\n'
                            '    guard: {version: 3, min_agreement: 0.99, window_s: 60, min_requests: 20}\n')
    rng = np.random.RandomState(3)
    versions = [gateway.client.infer("mlp", [mlp_input(rng)[0]]).get_response().model_version for _ in range(60)]
    wait_for("the guard trips", lambda: shadow_view(gateway)["guard"]["tripped"])
    view = shadow_view(gateway)
    assert view["guard"]["why"].startswith("agreement: shadow agreement 0.0000"), view["guard"]
    assert [(v["version"], v["weight_in_force"]) for v in view["split"]] == [(1, 9), (3, 0)], view
    assert {gateway.client.infer("mlp", [mlp_input(rng)[0]]).get_response().model_version for _ in range(30)} == {"1"}
    assert "3" in versions, "version 3 had its share before the guard tripped"
    m = scrape(gateway)
    assert total(m, "infermesh_gateway_rollbacks", "infermesh_gateway_rollbacks_total", model="mlp", version="3", why="agreement") == 1


@pytest.fixture
def canary_pair(tmp_path):
    """canary version 1 on one worker; version 2, failing half its requests, on another."""
    good = repo(tmp_path / "good", versions=(1,))
    bad = repo(tmp_path / "bad", versions=(2,), extra='parameters { key: "failure_rate" value: { string_value: "0.5" } }\n')
    workers = [Worker("--model-repository", str(good)), Worker("--model-repository", str(bad))]
    routes = tmp_path / "routes.yaml"
    yield workers, routes
    for w in workers:
        w.stop()


def canary_x():
    i = grpcclient.InferInput("INPUT0", [4], "FP32")
    i.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return i


def test_the_guard_trips_on_errors_and_an_edit_restores_the_split(canary_pair):
    workers, routes = canary_pair
    routes.write_text('models:\n  canary:\n    split: {"1": 1, "2": 1}\n'
                      '    guard: {version: "2", max_error_rate: 0.1, window_s: 60, min_requests: 20}\n')
    g = Gateway(*workers, extra=("--routes", str(routes)))
    try:
        view = shadow_view(g, "canary")["guard"]
        assert not view["armed"] and view["requests"] == 0 and not view["tripped"], view
        failed = 0
        for _ in range(60):
            try:
                g.client.infer("canary", [canary_x()])
            except grpcclient.InferenceServerException as e:
                assert e.status() == "StatusCode.INTERNAL", e
                failed += 1
        assert 1 <= failed <= 20, failed
        view = shadow_view(g, "canary")
        assert view["guard"]["tripped"] and view["guard"]["why"].startswith("error_rate: error rate 0.5"), view
        assert [(v["version"], v["weight_in_force"]) for v in view["split"]] == [(1, 1), (2, 0)], view
        # Traffic moved off version 2: every request now succeeds on version 1.
        assert {version_of(g.client) for _ in range(40)} == {"1"}
        m = scrape(g)
        assert total(m, "infermesh_gateway_rollbacks", "infermesh_gateway_rollbacks_total",
                     model="canary", version="2", why="error_rate") == 1
        assert any("guard took version 2 out of the split" in line for line in g.log)
        # An edit of the model's entry restores the split (and re-arms a fresh guard).
        reload(g, routes, 'models:\n  canary:\n    split: {"1": 1, "2": 1}\n'
                          '    guard: {version: "2", max_error_rate: 0.9, window_s: 60, min_requests: 20}\n')
        seen = set()
        for _ in range(20):
            try:
                seen.add(version_of(g.client))
            except grpcclient.InferenceServerException:
                seen.add("2")
        assert seen == {"1", "2"}, seen
        assert not shadow_view(g, "canary")["guard"]["tripped"]
    finally:
        g.stop()


def test_the_guard_never_takes_out_the_last_version(canary_pair):
    workers, routes = canary_pair
    routes.write_text('models:\n  canary:\n    split: {"1": 0, "2": 1}\n'
                      '    guard: {version: 2, max_error_rate: 0.1, min_requests: 10}\n')
    g = Gateway(*workers, extra=("--routes", str(routes)))
    try:
        for _ in range(30):
            try:
                g.client.infer("canary", [canary_x()])
            except grpcclient.InferenceServerException:
                pass
        guard = shadow_view(g, "canary")["guard"]
        assert not guard["tripped"] and "error_rate" in guard["why"], guard
        assert total(scrape(g), "infermesh_gateway_rollbacks_withheld", "infermesh_gateway_rollbacks_withheld_total",
                     model="canary", version="2", why="error_rate") == 1
        assert [(v["version"], v["weight_in_force"]) for v in shadow_view(g, "canary")["split"]] == [(1, 0), (2, 1)]
    finally:
        g.stop()


def test_shadows_are_dropped_under_overload_and_no_client_request_fails(tmp_path):
    """The shadow target takes ten times the clients' deadline: copies fill the in-flight
    limit and the rest are dropped; every client request still succeeds in time."""
    root = repo(tmp_path / "repo", versions=(1,))
    shutil.copytree(root / "canary", root / "slow")
    (root / "slow" / "config.pbtxt").write_text(
        IDENTITY + 'parameters { key: "delay_ms" value: { string_value: "2000" } }\n')
    w = Worker("--model-repository", str(root))
    routes = tmp_path / "routes.yaml"
    routes.write_text("models:\n  canary:\n    shadow: {target: {model: slow}}\n")
    g = Gateway(w, extra=("--routes", str(routes)))
    try:
        def one(_):
            c = grpcclient.InferenceServerClient(g.url)
            try:
                for _ in range(25):
                    r = c.infer("canary", [canary_x()], client_timeout=0.2)
                    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
            finally:
                c.close()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(4)))
        s = shadow_of(g, "canary")
        # 32 copies in flight at most, each waiting 2 s there: most of the 100 are dropped.
        assert s["dropped"] >= 50 and s["in_flight"] <= 32, s
        assert total(scrape(g), "infermesh_gateway_shadow", "infermesh_gateway_shadow_total",
                     model="canary", target="slow", result="dropped") == s["dropped"]
    finally:
        g.stop()
        w.stop()
