#!/usr/bin/env python3
"""Writes the bundled model repository (Triton layout: <model>/1/model.onnx).

Deterministic: fixed seeds and data, so running it twice gives byte-identical files.
Every model is IR 8 / opset 17, which ONNX Runtime 1.31 loads (onnx 1.22 would otherwise
write a newer IR that it rejects). Run with the project venv: .venv/bin/python models/generate.py
"""
import json
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent
OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 8


def save(model: onnx.ModelProto, name: str) -> pathlib.Path:
    model.ir_version = IR_VERSION
    model.producer_name = "infermesh models/generate.py"
    model.producer_version = ""
    onnx.checker.check_model(model)
    path = ROOT / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def digits() -> None:
    """A real trained classifier: logistic regression on scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    # skl2onnx names outputs label / probabilities; keep those names.
    save(model, "digits")
    # Eight rows: within the default max_batch_size of models without a config.
    samples = x_test[:8]
    labels = clf.predict(samples).tolist()
    (ROOT / "digits" / "samples.json").write_text(
        json.dumps({"inputs": samples.tolist(), "labels": labels}, indent=None) + "\n"
    )
    # One row as `infermesh infer --input input=@models/digits/example.json` takes it.
    (ROOT / "digits" / "example.json").write_text(json.dumps(samples[:1].tolist()) + "\n")
    print(f"digits: test accuracy {clf.score(x_test, y_test):.3f}")


def mlp() -> None:
    """The benchmark MLP: input FP32 [N,784] -> 1024 -> 1024 -> output FP32 [N,10]."""
    rng = np.random.RandomState(0)
    sizes = [784, 1024, 1024, 10]
    nodes, inits = [], []
    prev = "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.randn(fan_in, fan_out) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.randn(fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        out = "output" if last else f"h{i}"
        gemm_out = out if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    save(helper.make_model(graph, opset_imports=OPSET), "mlp")


def multi_io() -> None:
    """Several inputs and outputs of different datatypes, BYTES included."""
    v = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            # Each string row duplicated: [N,1] -> [N,2].
            helper.make_node("Concat", ["text", "text"], ["text_twice"], axis=1),
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
            helper.make_node("Add", ["k", "k_one"], ["k_plus"]),
            helper.make_node("Neg", ["h"], ["h_neg"]),
        ],
        "multi_io",
        [
            v("text", TensorProto.STRING, ["N", 1]),
            v("x", TensorProto.FLOAT, ["N", 4]),
            v("k", TensorProto.INT32, ["N", 1]),
            v("h", TensorProto.FLOAT16, ["N", 2]),
        ],
        [
            v("text_twice", TensorProto.STRING, ["N", 2]),
            v("y", TensorProto.FLOAT, ["N", 4]),
            v("k_plus", TensorProto.INT32, ["N", 1]),
            v("h_neg", TensorProto.FLOAT16, ["N", 2]),
        ],
        [
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(1, np.int32), "k_one"),
        ],
    )
    save(helper.make_model(graph, opset_imports=OPSET), "multi_io")


# Protocol datatype -> ONNX element type, for every type ONNX Runtime serves.
ALL_TYPES = {
    "bool": TensorProto.BOOL,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "fp16": TensorProto.FLOAT16,
    "bf16": TensorProto.BFLOAT16,
    "fp32": TensorProto.FLOAT,
    "fp64": TensorProto.DOUBLE,
    "bytes": TensorProto.STRING,
}


def all_types() -> None:
    """out_<type> = Identity(in_<type>), [N,3], for every datatype."""
    v = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in ALL_TYPES],
        "all_types",
        [v(f"in_{t}", et, ["N", 3]) for t, et in ALL_TYPES.items()],
        [v(f"out_{t}", et, ["N", 3]) for t, et in ALL_TYPES.items()],
    )
    save(helper.make_model(graph, opset_imports=OPSET), "all_types")


def check() -> None:
    """Loads every model in ONNX Runtime and runs it once."""
    import onnxruntime as ort

    for path in sorted(ROOT.glob("*/1/model.onnx")):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            shape = [2 if not isinstance(d, int) else d for d in i.shape]
            if i.type == "tensor(string)":
                feeds[i.name] = np.full(shape, "ab", dtype=object)
            elif i.type == "tensor(bfloat16)":
                continue  # numpy has no bfloat16; the Rust tests cover it
            else:
                dt = {"tensor(float16)": np.float16, "tensor(bool)": np.bool_}.get(i.type)
                dt = dt or np.dtype(i.type[7:-1].replace("float", "float32").replace("double", "float64"))
                feeds[i.name] = np.ones(shape, dtype=dt)
        if len(feeds) < len(sess.get_inputs()):
            print(f"{path.parent.parent.name}: loads (not run here: bfloat16 input)")
            continue
        outs = sess.run(None, feeds)
        print(f"{path.parent.parent.name}: ok, outputs {[o.name for o in sess.get_outputs()]}, first {outs[0].ravel()[:3]}")


if __name__ == "__main__":
    digits()
    mlp()
    multi_io()
    all_types()
    check()
