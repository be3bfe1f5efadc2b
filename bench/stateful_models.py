"""Small stateful ONNX models with Triton sequence_batching configs, for the stateful
tests and bench/sequences.sh.

- `accumulate` (oldest) and `accumulate_direct` (direct): OUTPUT = INPUT + state, and
  the new state is OUTPUT: a running sum over the sequence, kept by the worker (implicit
  state STATE_IN -> STATE_OUT, initial zeros).
- `accumulate_unbatched`: the same with max_batch_size 0 (no batch dim anywhere).
- `controlled` (direct): the same running sum, restarted where the START control is 1,
  and ECHO = [START, END, READY, CORRID] as floats, so a test sees every control the
  worker fed.
"""
import pathlib

import numpy as np

WIDTH = 4


def _save(graph, path: pathlib.Path) -> None:
    from onnx import helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def accumulate_graph(batched: bool = True):
    from onnx import TensorProto, helper
    dims = ["N", WIDTH] if batched else [WIDTH]
    f = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: E731
    return helper.make_graph(
        [helper.make_node("Add", ["INPUT", "STATE_IN"], ["OUTPUT"]),
         helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"])],
        "accumulate", [f("INPUT"), f("STATE_IN")], [f("OUTPUT"), f("STATE_OUT")])


def controlled_graph():
    from onnx import TensorProto, helper
    t = lambda name, ty, w=1: helper.make_tensor_value_info(name, ty, ["N", w])  # noqa: E731
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("Cast", ["START"], ["s"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "s"], ["keep"]),
        helper.make_node("Mul", ["STATE_IN", "keep"], ["prev"]),
        helper.make_node("Add", ["prev", "INPUT"], ["OUTPUT"]),
        helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"]),
        helper.make_node("Cast", ["READY"], ["r"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["CORRID"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["s", "END", "r", "c"], ["ECHO"], axis=1),
    ]
    return helper.make_graph(
        nodes, "controlled",
        [t("INPUT", TensorProto.FLOAT), t("STATE_IN", TensorProto.FLOAT),
         t("START", TensorProto.INT32), t("END", TensorProto.FLOAT),
         t("READY", TensorProto.BOOL), t("CORRID", TensorProto.UINT64)],
        [t("OUTPUT", TensorProto.FLOAT), t("STATE_OUT", TensorProto.FLOAT),
         t("ECHO", TensorProto.FLOAT, 4)],
        [one])


STATE = """  state [ {{ input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_FP32 dims: [ {w} ] }} ]"""


def accumulate_config(name: str, strategy: str, idle_us: int, max_batch: int = 8) -> str:
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  {strategy}
{STATE.format(w=WIDTH)}
}}
"""


def controlled_config(idle_us: int) -> str:
    return f"""name: "controlled"
backend: "onnxruntime"
max_batch_size: 4
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] }}, {{ name: "ECHO" data_type: TYPE_FP32 dims: [ 4 ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  direct {{ }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
{STATE.format(w=1)}
}}
"""


OLDEST = "oldest { max_candidate_sequences: 64 preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 500 }"
DIRECT = "direct { }"


def write(root: pathlib.Path, idle_us: int = 5_000_000) -> pathlib.Path:
    """Writes the three models into the repository `root`; returns it."""
    for name, strategy in (("accumulate", OLDEST), ("accumulate_direct", DIRECT)):
        _save(accumulate_graph(), root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(accumulate_config(name, strategy, idle_us))
    # max_batch_size 0: the model sees one request's tensors, no batch dim.
    _save(accumulate_graph(batched=False), root / "accumulate_unbatched" / "1" / "model.onnx")
    (root / "accumulate_unbatched" / "config.pbtxt").write_text(
        accumulate_config("accumulate_unbatched", DIRECT, idle_us, max_batch=0))
    _save(controlled_graph(), root / "controlled" / "1" / "model.onnx")
    (root / "controlled" / "config.pbtxt").write_text(controlled_config(idle_us))
    return root


def running_sums(chunks: list[np.ndarray]) -> list[np.ndarray]:
    """The reference: each request's OUTPUT is the sum of the sequence's inputs so far."""
    return list(np.cumsum(np.stack(chunks), axis=0))
