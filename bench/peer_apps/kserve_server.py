"""KServe's Python model server (the `kserve` package) serving the MLP with ONNX Runtime,
as KServe's custom-model docs show: a kserve.Model with load() and predict() on the
Open Inference (v2) protocol, here driven over its gRPC endpoint.

KServe has no ModelConfig RPC; get_input_types() fills ModelMetadata, which is all
`infermesh bench` reads to build its requests.

Env: PEER_MODEL (the .onnx file), PEER_INTRA_OP_THREADS (0: ONNX Runtime's default, one per
core: this is the only process)."""
import os

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


def _spec(node) -> dict:
    return {"name": node.name, "datatype": "FP32", "shape": [d if isinstance(d, int) else -1 for d in node.shape]}


class OnnxModel(kserve.Model):
    def __init__(self, name: str):
        super().__init__(name)
        self.session = None
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("PEER_INTRA_OP_THREADS", "0"))
        self.session = ort.InferenceSession(os.environ["PEER_MODEL"], opts,
                                            providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    # ONNX names its open dims ("batch"); the v2 protocol says -1.
    def get_input_types(self):
        return [_spec(i) for i in self.session.get_inputs()]

    def get_output_types(self):
        return [_spec(o) for o in self.session.get_outputs()]

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        outputs = []
        for meta, y in zip(self.session.get_outputs(), self.session.run(None, feeds)):
            out = InferOutput(name=meta.name, shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y, binary_data=True)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id)


if __name__ == "__main__":
    # kserve.model_server parses the standard flags (--grpc_port, --http_port, ...).
    kserve.ModelServer().start([OnnxModel(os.environ.get("PEER_MODEL_NAME", "mlp"))])
