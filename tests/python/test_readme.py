"""The README's commands, run as written against the tree this suite built, so the README
cannot drift: its first command (`scripts/up.sh --check`, with the debug build instead of
a release build and a free port instead of 8001), then every request line, the Python
block and the Node block against a running mesh (localhost:8001 and target/release/
replaced by the mesh's address and the built binaries)."""
import os
import pathlib
import re
import subprocess
import time

import pytest

from conftest import ROOT, binary

README = (ROOT / "README.md").read_text()
BIN_DIR = str(pathlib.Path(binary("infermesh")).parent)


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def env():
    return {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}


def test_the_first_command_runs_a_mesh_that_answers():
    first = blocks("sh")[0].splitlines()[0].split("#")[0].strip()
    assert first == "scripts/up.sh", first
    out = subprocess.run(["bash", "-c", f"{first} --check"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**env(), "INFERMESH_INFERMESH_BIN": binary("infermesh"),
                              "INFERMESH_UP_LISTEN": "127.0.0.1:0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"digits: predicted (\[.*\]), expected \1", out.stdout), out.stdout


@pytest.fixture(scope="module")
def gateway():
    proc = subprocess.Popen([binary("infermesh"), "up", "--listen", "127.0.0.1:0", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    line = ""
    while "infermesh is up" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "up exited early"
        assert time.monotonic() < deadline
    yield re.search(r"gateway on (\S+),", line).group(1), re.search(r"HTTP/REST on http://(\S+)", line).group(1)
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def as_here(command, addresses):
    grpc, http = addresses
    return (command.replace("localhost:8001", grpc).replace("localhost:8000", http)
            .replace("target/release/", BIN_DIR + "/"))


def requests():
    """Each command of the README's request blocks (every sh block after the first)."""
    return [line for block in blocks("sh")[1:] for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("command", requests())
def test_each_request_line_works(gateway, command):
    out = subprocess.run(["bash", "-c", as_here(command, gateway)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env())
    assert out.returncode == 0, (command, out.stdout[-2000:], out.stderr[-2000:])
    expect = {" models --url": "READY", " infer --url": "label", " list": "inference.GRPCInferenceService",
              "ModelMetadata": '"outputs"', "node ": "label", "curl -s -d": '"model_name":"digits"'}
    for key, text in expect.items():
        if key in command:
            assert text in out.stdout, (command, out.stdout[-2000:])


def test_the_python_block_works(gateway):
    (code,) = blocks("python")
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", as_here(code, gateway)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("[["), out.stdout  # the (1, 10) output array


def test_every_command_covered():
    kinds = " ".join(requests())
    for what in ["infermesh models", "infermesh infer", "grpcurl", "node ", "curl -s -d"]:
        assert what in kinds, what
