"""Triton's own Python client against the infermesh worker, with outputs compared to
Python onnxruntime on the same model files."""
import json
import queue

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import MODELS


def reference(model: str, feeds: dict) -> dict:
    sess = ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def digits_rows(n=8):
    samples = json.loads((MODELS / "digits" / "samples.json").read_text())
    return np.array(samples["inputs"][:n], dtype=np.float32), samples["labels"][:n]


def test_metadata_and_config(client):
    server = client.get_server_metadata()
    assert server.name == "infermesh"
    meta = client.get_model_metadata("mlp")
    assert meta.inputs[0].name == "input" and meta.inputs[0].datatype == "FP32"
    assert list(meta.inputs[0].shape) == [-1, 784]
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [784]
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("no_such_model")


def test_infer_matches_onnxruntime(client):
    x, labels = digits_rows()
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp])
    ref = reference("digits", {"input": x})
    assert result.as_numpy("label").tolist() == labels == ref["label"].tolist()
    np.testing.assert_allclose(result.as_numpy("probabilities"), ref["probabilities"], rtol=1e-5, atol=1e-6)

    mlp_x = np.random.RandomState(1).rand(3, 784).astype(np.float32)
    inp = grpcclient.InferInput("input", [3, 784], "FP32")
    inp.set_data_from_numpy(mlp_x)
    out = client.infer("mlp", [inp]).as_numpy("output")
    np.testing.assert_allclose(out, reference("mlp", {"input": mlp_x})["output"], rtol=1e-4, atol=1e-5)


def test_requested_output_subset(client):
    x, _ = digits_rows(2)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert result.as_numpy("label") is None
    assert result.as_numpy("probabilities").shape == (2, 10)


def multi_io_inputs(n):
    text = np.array([[f"row {i} \u00e9"] for i in range(n)], dtype=np.object_)
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    k = np.arange(n, dtype=np.int32).reshape(n, 1)
    h = np.linspace(-2, 2, n * 2).astype(np.float16).reshape(n, 2)
    arrays = {"text": (text, "BYTES"), "x": (x, "FP32"), "k": (k, "INT32"), "h": (h, "FP16")}
    inputs = []
    for name, (arr, dt) in arrays.items():
        i = grpcclient.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    return inputs, {k: v[0] for k, v in arrays.items()}


def test_bytes_and_fp16(client):
    inputs, feeds = multi_io_inputs(3)
    result = client.infer("multi_io", inputs)
    ref = reference("multi_io", feeds)
    got = result.as_numpy("text_twice")
    assert [[s.decode() for s in row] for row in got] == ref["text_twice"].tolist()
    np.testing.assert_array_equal(result.as_numpy("y"), ref["y"])
    np.testing.assert_array_equal(result.as_numpy("k_plus"), ref["k_plus"])
    assert result.as_numpy("h_neg").dtype == np.float16
    np.testing.assert_array_equal(result.as_numpy("h_neg"), ref["h_neg"])


NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    # tritonclient takes BF16 as float32 arrays and truncates them.
    "BF16": np.float32,
}


@pytest.mark.parametrize("triton", list(NUMPY))
def test_datatypes_round_trip(client, triton):
    """all_types echoes every input; each datatype is checked through a real model."""
    name = f"out_{triton.lower()}"
    meta = client.get_model_metadata("all_types")
    dtype = NUMPY[triton]
    if dtype is np.bool_:
        want = np.arange(6).reshape(2, 3) % 2 == 1
    else:
        # Values exact in every type, bf16 included.
        want = (np.arange(6).reshape(2, 3) * 3).astype(dtype)
    inputs = []
    for m in meta.inputs:
        i = grpcclient.InferInput(m.name, [2, 3], m.datatype)
        if m.datatype == triton:
            i.set_data_from_numpy(want)
        elif m.datatype == "BYTES":
            i.set_data_from_numpy(np.full((2, 3), b"z", dtype=np.object_))
        else:
            i.set_data_from_numpy(np.zeros((2, 3), dtype=NUMPY[m.datatype]))
        inputs.append(i)
    result = client.infer("all_types", inputs, outputs=[grpcclient.InferRequestedOutput(name)])
    got = result.as_numpy(name)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)


def test_stream_with_ids(client):
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        x, labels = digits_rows(6)
        for i in range(6):
            inp = grpcclient.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(x[i : i + 1])
            client.async_stream_infer("digits", [inp], request_id=f"r{i}")
        bad = grpcclient.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
        client.async_stream_infer("digits", [bad], request_id="bad")
        got = [responses.get(timeout=30) for _ in range(7)]
    finally:
        client.stop_stream()
    ok = [(r.get_response().id, int(r.as_numpy("label")[0])) for r, e in got if e is None]
    assert ok == [(f"r{i}", labels[i]) for i in range(6)]
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "dim 1 is 63" in str(errors[0])


@pytest.mark.parametrize(
    "build,code,needle",
    [
        (lambda: ("mlp", [("input", [1, 784], "FP64", np.zeros((1, 784), np.float64))]), "INVALID_ARGUMENT", "expected FP32"),
        (lambda: ("mlp", [("input", [1, 10], "FP32", np.zeros((1, 10), np.float32))]), "INVALID_ARGUMENT", "dim 1 is 10"),
        (lambda: ("nope", [("input", [1, 10], "FP32", np.zeros((1, 10), np.float32))]), "NOT_FOUND", "unknown model 'nope'"),
    ],
)
def test_errors_reach_triton_clients(client, build, code, needle):
    model, specs = build()
    inputs = []
    for name, shape, dt, arr in specs:
        i = grpcclient.InferInput(name, shape, dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs)
    assert code in e.value.status()
    assert needle in e.value.message()
