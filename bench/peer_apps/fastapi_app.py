"""The classic Python serving stack, written as its tutorials write it: FastAPI + pydantic
for HTTP/JSON, ONNX Runtime for the model, run by uvicorn with one worker per core.

Env: PEER_MODEL (the .onnx file), PEER_INTRA_OP_THREADS (per worker process: workers x
threads = cores, so the processes do not fight over the cores)."""
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

opts = ort.SessionOptions()
opts.intra_op_num_threads = int(os.environ.get("PEER_INTRA_OP_THREADS", "1"))
session = ort.InferenceSession(os.environ["PEER_MODEL"], opts, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
app = FastAPI()


class Request(BaseModel):
    inputs: list[list[float]]


@app.get("/health")
def health() -> dict:
    return {"ok": True}


# A plain `def`: FastAPI runs it in its thread pool, as its docs advise for blocking calls.
@app.post("/predict")
def predict(req: Request) -> dict:
    x = np.asarray(req.inputs, dtype=np.float32)
    (y,) = session.run(None, {input_name: x})
    return {"outputs": y.tolist()}
