"""bench/triton.py's harness at tiny durations, so it cannot rot: every side answers and
the table is written. No tritonserver exists on CI machines, so a stand-in takes its place:
a script that reads Triton's flags and starts the worker on that port and repository. Never
a timing: the numbers belong to the real benchmark."""
import json
import pathlib
import subprocess
import sys

from conftest import ROOT, binary


def test_the_triton_benchmark_runs_every_side(tmp_path):
    bin_dir = pathlib.Path(binary("infermesh")).parent
    fake = tmp_path / "tritonserver"
    fake.write_text(f"""#!/bin/sh
# Triton's flags in, the worker's out.
for a in "$@"; do
  case "$a" in
    --grpc-port=*) port="${{a#--grpc-port=}}" ;;
    --model-repository=*) repo="${{a#--model-repository=}}" ;;
  esac
done
exec {bin_dir}/infermesh-worker --model-repository "$repo" --grpc-address 127.0.0.1 --grpc-port "$port" \\
  --health-port 0 --allow-metrics false --shutdown-grace 0s
""")
    fake.chmod(0o755)
    cmd = [sys.executable, str(ROOT / "bench/triton.py"), "--tritonserver", str(fake), "--bin-dir", str(bin_dir),
           "--gateway", "--seconds-per-row", "0.3", "--rows", "unary:1,stream:4", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "triton.json").read_text())["results"]
    assert set(res) == {"unary 1", "stream 4"}
    for row in res.values():
        assert set(row) == {"worker", "gateway", "triton"}
        for r in row.values():
            assert r["ok"] > 0 and r["errors"] == 0 and r["cpu_us_per_req"] > 0, r
    table = (tmp_path / "triton.md").read_text()
    assert "| one stream, 4 in flight |" in table and "version not printed" in table


def test_the_triton_benchmark_asks_for_the_server():
    run = subprocess.run([sys.executable, str(ROOT / "bench/triton.py")], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode != 0 and "--tritonserver" in run.stderr
