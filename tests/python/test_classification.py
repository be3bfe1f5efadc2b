"""Triton's classification extension with Triton's own clients: an output requested with
class_count=N comes back as its N best "VALUE:INDEX[:LABEL]" strings per row, over gRPC
and HTTP, from a worker and through a gateway; a bad count is refused naming the output."""
import json
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import MODELS, Gateway, Worker

ROWS = np.array(json.loads((MODELS / "digits/samples.json").read_text())["inputs"][:2], dtype=np.float32)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    shutil.copytree(MODELS / "digits", root / "digits")
    shutil.copytree(MODELS / "digits", root / "named")
    (root / "named" / "labels.txt").write_text("".join(f"digit-{i}\n" for i in range(10)))
    (root / "named" / "config.pbtxt").write_text(
        'max_batch_size: 8\noutput [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] '
        'label_filename: "labels.txt" } ]\n')
    worker = Worker("--model-repository", str(root))
    gateway = Gateway(worker)
    yield {"worker": worker, "gateway": gateway}
    assert gateway.stop() == 0
    assert worker.stop() == 0


def expected(probs, n, labels=False):
    out = []
    for row in probs:
        best = sorted(range(len(row)), key=lambda i: (-row[i], i))[:n]
        out.append([f"{row[i]:.6f}:{i}" + (f":digit-{i}" if labels else "") for i in best])
    return out


@pytest.mark.parametrize("which", ["worker", "gateway"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_class_count_gives_the_best_classes(servers, which, protocol):
    server = servers[which]
    mod = grpcclient if protocol == "grpc" else httpclient
    client = mod.InferenceServerClient(server.url if protocol == "grpc" else server.http_url)
    x = mod.InferInput("input", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    probs = client.infer("digits", [x]).as_numpy("probabilities")
    for model, labels in [("digits", False), ("named", True)]:
        got = client.infer(model, [x], outputs=[mod.InferRequestedOutput("probabilities", class_count=3)])
        classes = got.as_numpy("probabilities")
        assert classes.shape == (2, 3)
        assert [[c.decode() for c in row] for row in classes] == expected(probs, 3, labels)


def test_a_bad_class_count_is_refused_naming_the_output(servers):
    client = servers["worker"].client
    x = grpcclient.InferInput("input", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    out = grpcclient.InferRequestedOutput("label", class_count=2)
    # label is INT64: ranked as numbers, fine; a BYTES output is not.
    assert client.infer("digits", [x], outputs=[out]).as_numpy("label").shape == (2, 1)
    import urllib.error
    import urllib.request
    body = json.dumps({"inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP32",
                                   "data": ROWS.flatten().tolist()}],
                       "outputs": [{"name": "probabilities", "parameters": {"classification": "three"}}]}).encode()
    req = urllib.request.Request(f"http://{servers['worker'].http_url}/v2/models/digits/infer", data=body)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    said = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and "output 'probabilities' parameter 'classification'" in said, said
