#!/usr/bin/env python3
"""Writes the bundled model repository (Triton layout: <model>/1/model.onnx).

Deterministic: fixed seeds and data, and protobuf's deterministic serialisation, so
running it twice gives byte-identical files. Every model is IR 8 / opset 17: onnx 1.22
would otherwise stamp a newer IR, which ONNX Runtime 1.31 refuses to load.
The first dimension of every input and output is the dynamic batch dimension "N".
Run with the project venv: .venv/bin/python models/generate.py
"""
import json
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent
OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 8
v = helper.make_tensor_value_info


def save(model: onnx.ModelProto, name: str) -> pathlib.Path:
    model.ir_version = IR_VERSION
    model.producer_name = "infermesh models/generate.py"
    model.producer_version = ""
    # skl2onnx lists the default domain twice; keep one entry per domain.
    opsets = {o.domain: o.version for o in model.opset_import}
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, ver) for d, ver in sorted(opsets.items()))
    # Name the batch dimension everywhere (skl2onnx leaves it anonymous), so metadata
    # reads the same for every model.
    for vi in list(model.graph.input) + list(model.graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        assert not dim0.HasField("dim_value"), f"{name}/{vi.name}: fixed batch dim"
        dim0.dim_param = "N"
    onnx.checker.check_model(model, full_check=True)
    path = ROOT / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def session(name: str):
    import onnxruntime as ort

    path = ROOT / name / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def digits() -> None:
    """A real trained classifier: logistic regression on scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        # No ZipMap: outputs stay plain tensors (label INT64 [N], probabilities FP32 [N,10])
        # instead of a sequence of maps, which the protocol cannot carry.
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    save(model, "digits")

    # Expected labels are what the ONNX model predicts, checked against scikit-learn.
    label, prob = session("digits").run(None, {"input": x_test})
    assert (label == clf.predict(x_test)).all(), "ONNX and scikit-learn labels differ"
    assert np.allclose(prob, clf.predict_proba(x_test), atol=1e-4)
    # Eight rows: within the default max_batch_size (8) of models without a config.
    n = 8
    (ROOT / "digits" / "samples.json").write_text(
        json.dumps({"inputs": x_test[:n].tolist(), "labels": label[:n].tolist()}) + "\n"
    )
    # One row as `infermesh infer --input input=@models/digits/example.json` takes it.
    (ROOT / "digits" / "example.json").write_text(json.dumps(x_test[:1].tolist()) + "\n")
    # The same row as a KServe v2 HTTP request body (`curl -d @models/digits/example-http.json`).
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x_test[:1].tolist()}]}
    (ROOT / "digits" / "example-http.json").write_text(json.dumps(body) + "\n")
    print(f"digits: test accuracy {(label == y_test).mean():.4f} on {len(y_test)} held-out rows")


def mlp() -> None:
    """The benchmark MLP: input FP32 [N,784] -> 1024 -> 1024 -> output FP32 [N,10]."""
    rng = np.random.RandomState(0)
    sizes = [784, 1024, 1024, 10]
    nodes, inits = [], []
    prev = "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        # He init keeps activations at a stable scale through the ReLUs: outputs are
        # finite and far from zero, so tests can tell a real run from a zero buffer.
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
        [v("input", TensorProto.FLOAT, ["N", 784])],
        [v("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    save(helper.make_model(graph, opset_imports=OPSET), "mlp")


def multi_io() -> None:
    """Several inputs and outputs of different datatypes, BYTES (ONNX strings) included."""
    graph = helper.make_graph(
        [
            # Each string row duplicated: [N,1] -> [N,2].
            helper.make_node("Concat", ["text", "text"], ["text_twice"], axis=1),
            # StringNormalizer only takes [C] or [1,C], so flatten [N,1] to [N] and back.
            # locale "C": ORT's default (en_US.UTF-8) is missing on minimal systems and
            # fails the session; "C" always exists and upper-cases ASCII only.
            # Needs N >= 1 (ORT rejects an empty string tensor here).
            helper.make_node("Reshape", ["text", "flat"], ["text_flat"]),
            helper.make_node(
                "StringNormalizer", ["text_flat"], ["upper_flat"],
                case_change_action="UPPER", locale="C",
            ),
            helper.make_node("Reshape", ["upper_flat", "column"], ["text_upper"]),
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
            v("text_upper", TensorProto.STRING, ["N", 1]),
            v("y", TensorProto.FLOAT, ["N", 4]),
            v("k_plus", TensorProto.INT32, ["N", 1]),
            v("h_neg", TensorProto.FLOAT16, ["N", 2]),
        ],
        [
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "column"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(1, np.int32), "k_one"),
        ],
    )
    save(helper.make_model(graph, opset_imports=OPSET), "multi_io")


# Protocol datatype (lower case, so BYTES is "bytes") -> ONNX element type and the numpy
# dtype used to check it; bf16 travels as its raw uint16 bits (numpy has no bfloat16).
ALL_TYPES = {
    "bool": (TensorProto.BOOL, np.bool_),
    "uint8": (TensorProto.UINT8, np.uint8),
    "uint16": (TensorProto.UINT16, np.uint16),
    "uint32": (TensorProto.UINT32, np.uint32),
    "uint64": (TensorProto.UINT64, np.uint64),
    "int8": (TensorProto.INT8, np.int8),
    "int16": (TensorProto.INT16, np.int16),
    "int32": (TensorProto.INT32, np.int32),
    "int64": (TensorProto.INT64, np.int64),
    "fp16": (TensorProto.FLOAT16, np.float16),
    "bf16": (TensorProto.BFLOAT16, np.uint16),
    "fp32": (TensorProto.FLOAT, np.float32),
    "fp64": (TensorProto.DOUBLE, np.float64),
    "bytes": (TensorProto.STRING, np.object_),
}


def all_types() -> None:
    """out_<type> = Identity(in_<type>), [N,3], for every datatype."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in ALL_TYPES],
        "all_types",
        [v(f"in_{t}", et, ["N", 3]) for t, (et, _) in ALL_TYPES.items()],
        [v(f"out_{t}", et, ["N", 3]) for t, (et, _) in ALL_TYPES.items()],
    )
    save(helper.make_model(graph, opset_imports=OPSET), "all_types")


def check() -> None:
    """Runs every model in ONNX Runtime on known inputs and prints its signature."""
    import onnxruntime as ort

    out = session("mlp").run(None, {"input": np.random.RandomState(1).rand(4, 784).astype(np.float32)})[0]
    assert out.shape == (4, 10) and np.isfinite(out).all() and np.abs(out).max() > 0.1
    print(f"mlp: output[0] = {np.array2string(out[0], precision=3)}")

    feeds = {
        "text": np.array([["row 0 é"], ["Hi there"], [""]], dtype=object),
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "k": np.array([[41], [-1], [2**31 - 1]], dtype=np.int32),
        "h": np.array([[1.5, -2], [0.25, 8], [0, -0]], dtype=np.float16),
    }
    got = dict(zip(["text_twice", "text_upper", "y", "k_plus", "h_neg"], session("multi_io").run(None, feeds)))
    assert got["text_twice"].tolist() == [["row 0 é"] * 2, ["Hi there"] * 2, ["", ""]]
    assert got["text_upper"].tolist() == [["ROW 0 é"], ["HI THERE"], [""]]
    assert (got["y"] == feeds["x"] * 2 + 1).all()
    assert got["k_plus"].tolist() == [[42], [0], [-(2**31)]]  # INT32 wraps
    assert (got["h_neg"] == -feeds["h"]).all()
    print("multi_io: outputs match")

    # numpy has no bfloat16: its input goes in as an OrtValue holding the raw bits.
    sess = session("all_types")
    feeds = {}
    for t, (et, dt) in ALL_TYPES.items():
        if dt is np.object_:
            a = np.array([["a", "ü", ""], ["", "xyz", "0"]], dtype=object)
        else:
            a = ((np.arange(6) % 2 == 1) if dt is np.bool_ else np.arange(6).astype(dt)).reshape(2, 3)
        feeds[f"in_{t}"] = a
    names = [f"out_{t}" for t in ALL_TYPES if t != "bf16"]
    bf16 = feeds["in_bf16"]
    feeds["in_bf16"] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bf16, TensorProto.BFLOAT16)
    for name, got in zip(names, sess.run(names, feeds)):
        a = feeds["in" + name[3:]]
        assert got.dtype == a.dtype and got.shape == a.shape and (got == a).all(), name
    # Nor can a bf16 output become a numpy array: read it back through an IOBinding into
    # our own buffer, on the model cut down to its bf16 path (IOBinding takes no strings).
    model = onnx.load(ROOT / "all_types" / "1" / "model.onnx")
    for part in (model.graph.node, model.graph.input, model.graph.output):
        keep = [x for x in part if (x.output[0] if hasattr(x, "op_type") else x.name).endswith("_bf16")]
        del part[:]
        part.extend(keep)
    bf16_sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    binding, out = bf16_sess.io_binding(), np.zeros_like(bf16)
    binding.bind_ortvalue_input("in_bf16", feeds["in_bf16"])
    binding.bind_ortvalue_output("out_bf16", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out, TensorProto.BFLOAT16))
    bf16_sess.run_with_iobinding(binding)
    assert (out == bf16).all(), "out_bf16"
    print(f"all_types: all {len(ALL_TYPES)} datatypes round-trip")

    for path in sorted(ROOT.glob("*/1/model.onnx")):
        sess = session(path.parent.parent.name)
        sig = lambda ts: ", ".join(f"{t.name} {t.type[7:-1]} {t.shape}" for t in ts)
        print(f"{path.relative_to(ROOT)} ({path.stat().st_size} bytes)")
        print(f"  in:  {sig(sess.get_inputs())}\n  out: {sig(sess.get_outputs())}")


if __name__ == "__main__":
    digits()
    mlp()
    multi_io()
    all_types()
    check()
