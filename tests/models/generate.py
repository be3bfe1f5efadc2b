#!/usr/bin/env python3
"""Writes the hostile-request test repository's ONNX model (Triton layout).

var_dims: Identity on inputs whose every dimension is variable, the shapes text models
and vector models take: text STRING [L], x FLOAT [N, M], h FLOAT16 [K]. IR 8 / opset 17
(ONNX Runtime 1.31 refuses newer IRs). Deterministic; run with the project venv:
.venv/bin/python tests/models/generate.py
"""
import pathlib

import onnx
from onnx import TensorProto, helper

ROOT = pathlib.Path(__file__).resolve().parent
v = helper.make_tensor_value_info

graph = helper.make_graph(
    [
        helper.make_node("Identity", ["text"], ["text_out"]),
        helper.make_node("Identity", ["x"], ["x_out"]),
        helper.make_node("Identity", ["h"], ["h_out"]),
    ],
    "var_dims",
    [v("text", TensorProto.STRING, ["L"]), v("x", TensorProto.FLOAT, ["N", "M"]),
     v("h", TensorProto.FLOAT16, ["K"])],
    [v("text_out", TensorProto.STRING, ["L"]), v("x_out", TensorProto.FLOAT, ["N", "M"]),
     v("h_out", TensorProto.FLOAT16, ["K"])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
model.producer_name = "infermesh tests/models/generate.py"
onnx.checker.check_model(model, full_check=True)
path = ROOT / "var_dims" / "1" / "model.onnx"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_bytes(model.SerializeToString(deterministic=True))
print(f"wrote {path}")
