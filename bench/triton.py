"""The infermesh worker beside NVIDIA Triton on the same repository, in one run: the MLP
(784-1024-1024-10) with Triton's recommended dynamic batching (`max_queue_delay_microseconds:
200`, one CPU instance), batch-1 requests from the same client (`infermesh bench`) on both
sides. Unary calls at concurrency 1/2/8/32 and one ModelStreamInfer stream with 1/4/32
messages in flight; req/s, p50, p99 and server CPU per request, with ratios. Rows alternate
between the servers so drift on the machine lands on both.

Triton is whatever install the user points at (`--tritonserver`, or $TRITONSERVER): NVIDIA's
container, a local build, the one PyTriton's wheel bundles. `--triton-ld-library-path` and
`--triton-backend-dir` pass what that install needs. `--old-bin-dir` (or $BENCH_OLD_BIN) puts
an older worker build beside the new one. A server that dies during a row is reported as
crashed for it and started again for the next."""
import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as h  # noqa: E402

ROOT = h.ROOT
MLP = ROOT / "models/mlp/1/model.onnx"
CONFIG = """platform: "onnxruntime_onnx"
max_batch_size: 64
dynamic_batching { max_queue_delay_microseconds: 200 }
instance_group [{ count: 1, kind: KIND_CPU }]
"""
VALUES = [(i % 97) / 97.0 for i in range(784)]
ROWS = [("unary", c) for c in (1, 2, 8, 32)] + [("stream", c) for c in (1, 4, 32)]


def server_pids(p) -> list[int]:
    return h.descendants(p.pid)


class Side:
    """One server under test, started (again) on demand."""

    def __init__(self, name, cmd_for_port, env, infermesh, input_arg, procs):
        self.name, self.cmd_for_port, self.env = name, cmd_for_port, env
        self.infermesh, self.input_arg, self.procs = infermesh, input_arg, procs
        self.proc, self.url, self.starts = None, None, 0

    def ready(self) -> bool:
        out, _, _ = h.run_measured([self.infermesh, "bench", "--url", self.url, "--model", "mlp", "--input",
                                    self.input_arg, "--concurrency", "1", "--requests", "5", "--json"], 30)
        return json.loads(out)["ok"] == 5

    def ensure(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        port = h.free_port()
        self.starts += 1
        self.proc = self.procs.start(f"{self.name}-{self.starts}", self.cmd_for_port(port), env=self.env)
        self.url = f"127.0.0.1:{port}"
        h.wait_until(self.ready, self.name, self.procs, timeout=120)

    def pids(self) -> list[int]:
        return server_pids(self.proc)

    def row(self, kind: str, concurrency: int, seconds: float) -> dict:
        self.ensure()
        meter = h.Meter({"server": self.pids()})
        try:
            r = h.grpc_load(self.infermesh, self.url, "mlp", concurrency, kind == "stream", seconds,
                            self.input_arg)
        except RuntimeError as e:
            if self.proc.poll() is not None:
                return {"crashed": f"exited with {self.proc.returncode}"}
            raise e
        if self.proc.poll() is not None:
            return {"crashed": f"exited with {self.proc.returncode}"}
        m = meter.done(r["ok"])["server"]
        r["cpu_us_per_req"] = m["cpu_s_per_1k"] * 1000 if m["cpu_s_per_1k"] is not None else None
        return r


class GatewaySide(Side):
    """The gateway (`--gateway`) in front of a worker of its own: the hop's added latency
    at each level beside the worker alone. CPU is the gateway's and the worker's together."""

    def __init__(self, bin_dir, worker_cmd, infermesh, input_arg, procs):
        gateway = str(pathlib.Path(bin_dir).resolve() / "infermesh-gateway")
        self.worker = Side("gateway's worker", worker_cmd, None, infermesh, input_arg, procs)
        cmd = lambda port: [gateway, "--workers", self.worker.url, "--grpc-address", "127.0.0.1",  # noqa: E731
                            "--grpc-port", str(port), "--health-port", "0", "--allow-metrics", "false",
                            "--shutdown-grace", "0s", "--threads", "1"]
        super().__init__("gateway", cmd, None, infermesh, input_arg, procs)

    def ensure(self) -> None:
        if self.worker.proc is None or self.worker.proc.poll() is not None:
            self.worker.ensure()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        super().ensure()

    def pids(self) -> list[int]:
        return server_pids(self.proc) + server_pids(self.worker.proc)


def triton_version(log: pathlib.Path) -> str:
    """Triton prints its metadata as a table at start: `| server_version | 2.51.0 |`."""
    for line in log.read_text(errors="replace").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == "server_version":
            return cells[1]
    return "version not printed"


def fmt(r: dict | None) -> str:
    if r is None:
        return "–"
    if "crashed" in r:
        return f"crashed ({r['crashed']})"
    errs = f", {r['errors']} errors" if r["errors"] else ""
    return f"{r['rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {r['cpu_us_per_req']:.0f} µs CPU/req{errs}"


def ratio(a: dict | None, b: dict | None) -> str:
    ok = a and b and "crashed" not in a and "crashed" not in b and a["rps"] and b["rps"]
    if not ok:
        return "–"
    return f"{a['rps'] / b['rps']:.2f}× req/s, {a['p50_ms'] / b['p50_ms']:.2f}× p50"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tritonserver", default=os.environ.get("TRITONSERVER"),
                    help="path to the tritonserver binary (or $TRITONSERVER)")
    ap.add_argument("--triton-ld-library-path", default=os.environ.get("TRITON_LD_LIBRARY_PATH", ""),
                    help="LD_LIBRARY_PATH for tritonserver (or $TRITON_LD_LIBRARY_PATH)")
    ap.add_argument("--triton-backend-dir", default=os.environ.get("TRITON_BACKEND_DIR"),
                    help="--backend-directory for tritonserver (or $TRITON_BACKEND_DIR)")
    ap.add_argument("--old-bin-dir", default=os.environ.get("BENCH_OLD_BIN"),
                    help="an older build's directory: its worker runs beside the new one")
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--gateway", action="store_true",
                    help="also the gateway in front of a worker: the hop's added latency at each level")
    ap.add_argument("--seconds-per-row", type=float, default=float(os.environ.get("BENCH_SECONDS", 8)))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--rows", default=",".join(f"{k}:{c}" for k, c in ROWS),
                    help="which rows, e.g. unary:1,stream:4 (default: all)")
    args = ap.parse_args()
    rows = [(k, int(c)) for k, c in (r.split(":") for r in args.rows.split(","))]
    if not args.tritonserver:
        sys.exit("bench/triton.py: give the tritonserver binary with --tritonserver PATH or TRITONSERVER=PATH")

    work = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-triton-bench-"))
    (work / "repo/mlp/1").mkdir(parents=True)
    (work / "repo/mlp/1/model.onnx").symlink_to(MLP)
    (work / "repo/mlp/config.pbtxt").write_text(CONFIG)
    (work / "input.json").write_text(json.dumps([VALUES]))
    (work / "logs").mkdir()
    infermesh = str(pathlib.Path(args.bin_dir).resolve() / "infermesh")
    input_arg = f"input=@{work / 'input.json'}"
    procs = h.Procs(work / "logs")

    def worker(bin_dir):
        return lambda port: [str(pathlib.Path(bin_dir).resolve() / "infermesh-worker"), "--model-repository",
                             str(work / "repo"), "--grpc-address", "127.0.0.1", "--grpc-port", str(port),
                             "--health-port", "0", "--allow-metrics", "false", "--shutdown-grace", "0s"]

    def triton(port):
        cmd = [args.tritonserver, f"--model-repository={work / 'repo'}", "--grpc-address=127.0.0.1",
               f"--grpc-port={port}", "--allow-http=false", "--allow-metrics=false", "--log-verbose=0"]
        return cmd + ([f"--backend-directory={args.triton_backend_dir}"] if args.triton_backend_dir else [])

    tenv = dict(os.environ)
    if args.triton_ld_library_path:
        tenv["LD_LIBRARY_PATH"] = args.triton_ld_library_path + ":" + tenv.get("LD_LIBRARY_PATH", "")
    sides = [Side("worker", worker(args.bin_dir), None, infermesh, input_arg, procs)]
    if args.old_bin_dir:
        sides.append(Side("worker, old build", worker(args.old_bin_dir), None, infermesh, input_arg, procs))
    if args.gateway:
        sides.append(GatewaySide(args.bin_dir, worker(args.bin_dir), infermesh, input_arg, procs))
    sides.append(Side("triton", triton, tenv, infermesh, input_arg, procs))

    results = {}
    try:
        for kind, c in rows:
            for side in sides:
                r = side.row(kind, c, args.seconds_per_row)
                results.setdefault(f"{kind} {c}", {})[side.name] = r
                print(f"{kind:6} {c:3}  {side.name:17}  {fmt(r)}", file=sys.stderr, flush=True)
        version = triton_version(work / "logs/triton-1.log")
    finally:
        procs.stop()

    env = [f"{k}={os.environ[k]}" for k in ("TRITONSERVER", "BENCH_OLD_BIN") if os.environ.get(k)]
    cmd = " ".join(env + ["bench/triton.sh"] + sys.argv[1:])
    lines = [f"# The worker beside Triton ({datetime.date.today()}, {os.cpu_count()} cores)", "",
             f"`{cmd}`", "", f"Triton {version}: `{args.tritonserver}`.",
             "The same repository on both: the MLP with", "", "```", CONFIG.strip(), "```", "",
             f"Client: `infermesh bench` on both sides, batch-1 requests, {args.seconds_per_row:g} s per row. "
             "Unary rows: N calls in flight on one connection. Stream rows: one ModelStreamInfer stream "
             "with N messages in flight. CPU is the server's own (user + system) per request.", ""]
    names = [s.name for s in sides]
    lines.append("| load | " + " | ".join(names) + " | worker ÷ triton |")
    lines.append("|---|" + "---|" * len(names) + "---|")
    for key, row in results.items():
        kind, c = key.split()
        label = f"unary, concurrency {c}" if kind == "unary" else f"one stream, {c} in flight"
        lines.append(f"| {label} | " + " | ".join(fmt(row.get(n)) for n in names)
                     + f" | {ratio(row.get('worker'), row.get('triton'))} |")
    table = "\n".join(lines) + "\n"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton.md").write_text(table)
    (out / "triton.json").write_text(json.dumps({"command": cmd, "triton": version, "results": results},
                                                indent=1))
    print(table)


if __name__ == "__main__":
    main()
