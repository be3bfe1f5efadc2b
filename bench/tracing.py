"""What metrics and traces cost, side by side in one run: gateway + 1 worker on the MLP,
`infermesh bench` unary at concurrency 32, with metrics off / metrics on / traces sampled
at 0.01 / traces sampled at 1.0. The collector is a real OTLP/gRPC receiver in its own
process that counts spans. Rows are run in rounds (every setup once per round) so drift
on this shared machine spreads over all of them; the table shows each setup's median."""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gateway import BIN, ROOT, free_port, wait_ready  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
RECEIVER = '''
import sys, threading
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb, trace_service_pb2_grpc as g
class R(g.TraceServiceServicer):
    def Export(self, req, ctx):
        return pb.ExportTraceServiceResponse()
s = grpc.server(futures.ThreadPoolExecutor(4)); g.add_TraceServiceServicer_to_server(R(), s)
s.add_insecure_port("127.0.0.1:" + sys.argv[1]); s.start(); s.wait_for_termination()
'''

SETUPS = {
    "metrics off, traces off": (["--allow-metrics", "false"], {}),
    "metrics on, traces off": ([], {}),
    "metrics on, traces 0 (decide and propagate only)": ([], {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}),
    "metrics on, traces 0.01": ([], {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
    "metrics on, traces 1.0": ([], {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
}


def run_setup(repo, flags, env, collector):
    procs = []
    env = {**os.environ, **env}
    if "OTEL_TRACES_SAMPLER" in env:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
    try:
        wport, gport = free_port(), free_port()
        common = ["--grpc-address", "127.0.0.1", "--metrics-port", "0", "--shutdown-grace", "0s", *flags]
        procs.append(subprocess.Popen([str(BIN / "infermesh-worker"), "--model-repository", str(repo), "--grpc-port",
                                       str(wport), "--health-port", "0", "--intra-op-threads", "1", *common], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([str(BIN / "infermesh-gateway"), "--workers", f"127.0.0.1:{wport}",
                                       "--grpc-port", str(gport), "--health-port", "0", "--threads", "1", *common], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"127.0.0.1:{gport}"
        wait_ready(url)
        cmd = [str(BIN / "infermesh"), "bench", "--url", url, "--model", "mlp", "--concurrency", "32",
               "--duration", f"{SECONDS}s", "--json"]
        subprocess.run(cmd[:-3] + ["--requests", "2000"], check=True, capture_output=True)  # warm-up
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def main():
    d = pathlib.Path(tempfile.mkdtemp(prefix="infermesh-trace-bench-"))
    (d / "mlp" / "1").mkdir(parents=True)
    (d / "mlp" / "1" / "model.onnx").symlink_to(ROOT / "models/mlp/1/model.onnx")
    (d / "mlp" / "config.pbtxt").write_text("max_batch_size: 64\ndynamic_batching { }\n")
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    results = {name: [] for name in SETUPS}
    try:
        for _ in range(ROUNDS):
            for name, (flags, env) in SETUPS.items():
                results[name].append(run_setup(d, flags, env, f"http://127.0.0.1:{port}"))
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    base = statistics.median(r["inferences_per_s"] for r in results["metrics off, traces off"])
    print(f"gateway + 1 worker, MLP, batch-1 requests, c=32, {SECONDS:.0f} s x {ROUNDS} rounds (median)\n")
    print("| setup | infer/s | p50 ms | p99 ms | errors | throughput vs off |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        tput = statistics.median(r["inferences_per_s"] for r in rs)
        p50 = statistics.median(r["p50_ms"] for r in rs)
        p99 = statistics.median(r["p99_ms"] for r in rs)
        errors = sum(r["errors"] for r in rs)
        print(f"| {name} | {tput:.0f} | {p50:.2f} | {p99:.2f} | {errors} | {tput / base:.1%} |")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "tracing.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
