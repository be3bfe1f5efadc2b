"""bench/peers.py's text: the nginx config it runs, the peers' configuration as it prints
it, and the markdown table with ratios against infermesh and the issue's targets."""
import json
import subprocess


def nginx_conf(d, port: int, workers: list[str]) -> str:
    # nginx's advice for proxying: upstream keepalive. keepalive_requests raised on both
    # sides: its default (1000) closes the client's one HTTP/2 connection every 1000
    # requests, a reconnect that no other setup here pays. client_max_body_size 0: a gRPC
    # stream is one request body, and the default 1m cuts a stream of these 3 KB messages
    # with INTERNAL after about 330 of them.
    return f"""
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  client_max_body_size 0;
  upstream workers {{ {' '.join(f'server {w};' for w in workers)} keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://workers; }}
  }}
}}
"""


def _versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['kserve', 'fastapi', 'pydantic', 'uvicorn', 'uvloop', 'httptools', 'onnxruntime', 'grpcio']}))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return {}


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        # "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."
        first = (out.stdout + out.stderr).splitlines()[0]
        return first.split(": ")[-1] if ": " in first else " ".join(first.split()[:2])
    except (OSError, IndexError):
        return "?"


def config(ctx, only: set, cores: int) -> list[str]:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    v = _versions(ctx.args.peers_python) if only & {"fastapi", "kserve"} else {}
    lines = [
        f"machine: {cores} cores ({cpu}), shared by every client and server; {ctx.args.seconds:g} s per row; "
        f"the same input values everywhere ((i mod 97)/97, 784 FP32), batch-1 requests",
        f"ONNX Runtime in-process: `infermesh bench engine`, intra-op threads = {cores} (one per core), "
        "spinning on (ONNX Runtime's default, its best case alone), one process per batch size",
        f"infermesh worker ({ctx.bin.name} build): `--intra-op-threads 0` (one per core) when alone, "
        f"{max(1, cores // 2)} each when two share the cores; pool spinning off (its default); "
        "mlp config.pbtxt `max_batch_size: 64 dynamic_batching { }`; metrics off",
        f"infermesh gateway ({ctx.bin.name} build): `--threads 1` (the README's advice for pods of up to 2 "
        "cores: scale replicas), p2c over PeakEWMA, per-message balancing of streams; metrics off",
    ]
    if "nginx" in only:
        lines.append(f"{_tool_version(['nginx', '-v'])}: `worker_processes auto` ({cores}), HTTP/2 listener, "
                     "`grpc_pass` to an upstream of the 2 workers with `keepalive 64`, `keepalive_requests` "
                     "raised (client and upstream), `client_max_body_size 0` (a stream is one body), access log off")
    if "fastapi" in only:
        lines.append(f"FastAPI {v.get('fastapi', '?')} + pydantic {v.get('pydantic', '?')} + uvicorn "
                     f"{v.get('uvicorn', '?')} (uvloop {v.get('uvloop', '?')}, httptools {v.get('httptools', '?')}) + "
                     f"onnxruntime {v.get('onnxruntime', '?')}: `uvicorn --workers {cores}` (one per core, as "
                     "uvicorn's and FastAPI's docs advise), access log off; a sync `def` endpoint (FastAPI's "
                     "thread pool, as its docs advise for blocking calls) with a pydantic body "
                     '`{"inputs": [[784 floats]]}`; ONNX Runtime 1 intra-op thread per worker process '
                     "(bench/peer_apps/fastapi_app.py)")
    if "kserve" in only:
        lines.append(f"KServe {v.get('kserve', '?')} (grpcio {v.get('grpcio', '?')}, onnxruntime "
                     f"{v.get('onnxruntime', '?')}): a `kserve.Model` with load()/predict() as its custom-model "
                     "docs show, ModelMetadata from get_input_types(), one process (its gRPC server is one "
                     "grpc.aio server; `--workers` forks only the REST server), ONNX Runtime intra-op threads = "
                     "cores (its default), per-request log lines off (`--configure_logging false "
                     "--enable_latency_logging false`); unary only: KServe has no ModelStreamInfer "
                     "(bench/peer_apps/kserve_server.py)")
    lines.append("clients: `infermesh bench` (one HTTP/2 connection; unary: N callers; stream: N in flight on "
                 "one ModelStreamInfer), raw input; " + (f"{_tool_version(['wrk', '-v'])}, `-t1 -cN --latency`, "
                 "a Lua script POSTing the JSON body (bench/peer_apps/wrk_post.lua); " if "fastapi" in only else "")
                 + "closed loop, latency per request")
    return lines


def _fmt_roles(server: dict, field: str, digits: int) -> str:
    vals = {k: v[field] for k, v in server.items() if v[field] is not None}
    if not vals:
        return ""
    total = sum(vals.values())
    if len(vals) == 1:
        return f"{total:.{digits}f}"
    return f"{total:.{digits}f} (" + " + ".join(f"{k} {x:.{digits}f}" for k, x in vals.items()) + ")"


def _targets(res: dict) -> list[str]:
    rows = {(r["key"], r["mode"], r["concurrency"]): r for r in res["rows"]}
    out = []
    for mode in ("unary", "stream"):
        g = rows.get(("gateway1", mode, 32))
        for name, key, pmode, want in (("FastAPI", "fastapi", "HTTP/JSON", 10), ("KServe", "kserve", "unary", 5)):
            p = rows.get((key, pmode, 32))
            if g and p and p["rps"]:
                out.append(f"gateway + 1 worker ({mode}) vs {name} at concurrency 32: {g['rps'] / p['rps']:.1f}× "
                           f"the throughput (target ≥ {want}×); p99 {g['p99_ms']:.2f} vs {p['p99_ms']:.2f} ms")
    ws = [rows[k] for k in (("worker", "unary", 32), ("worker", "stream", 32)) if k in rows]
    if ws and res["engine"]:
        best = max(res["engine"], key=lambda r: r["samples_per_s"])
        w = max(ws, key=lambda r: r["rps"])
        out.append(f"worker direct at concurrency 32 (best: {w['mode']}): {w['rps'] / best['samples_per_s']:.0%} of "
                   f"ONNX Runtime's best batch ({best['batch']}: {best['samples_per_s']:.0f}/s) (target ≥ 60%)")
    for mode in ("unary", "stream"):
        g, n = rows.get(("gateway2", mode, 32)), rows.get(("nginx", mode, 32))
        if g and n and g["server"]["gateway"]["cpu_s_per_1k"] and n["server"]["nginx"]["cpu_s_per_1k"]:
            out.append(f"proxy CPU per 1,000 requests at concurrency 32 ({mode}, 2 workers): gateway "
                       f"{g['server']['gateway']['cpu_s_per_1k']:.3f} s vs nginx "
                       f"{n['server']['nginx']['cpu_s_per_1k']:.3f} s (target: below nginx)")
    return out


def _against_baseline(rows: list) -> list[str]:
    """This build's gateway against --baseline-bin-dir's, row by row from the same run."""
    by = {(r["key"], r["mode"], r["concurrency"]): r for r in rows}
    out = []
    for (key, mode, c), old in sorted(by.items()):
        new = by.get((key.removesuffix("-baseline"), mode, c))
        if not key.endswith("-baseline") or not new or not old["rps"]:
            continue
        cpu = lambda r: r["server"].get("gateway", {}).get("cpu_s_per_1k")  # noqa: E731
        ratio = f"{cpu(new) / cpu(old):.2f}" if cpu(new) and cpu(old) else ""
        out.append(f"| {new['setup']} | {mode} | {c} | {new['rps']:.0f} | {old['rps']:.0f} | "
                   f"{new['rps'] / old['rps']:.2f} | {cpu(new) or 0:.3f} | {cpu(old) or 0:.3f} | {ratio} |")
    if not out:
        return []
    return ["", "This gateway against the baseline build, same run (gateway CPU in s per 1k requests):", "",
            "| setup | mode | concurrency | req/s | baseline req/s | ratio | CPU | baseline CPU | ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"] + out


def markdown(res: dict) -> str:
    rows = res["rows"]
    ref_key = "gateway1" if any(r["key"] == "gateway1" for r in rows) else "worker"
    ref = {r["concurrency"]: r for r in rows if r["key"] == ref_key and r["mode"] == "unary"}
    ref_label = next((r["setup"] for r in rows if r["key"] == ref_key), ref_key)
    lines = [f"### infermesh and its peers: MLP 784-1024-1024-10, batch-1 requests ({res['started']})", "",
             f"vs infermesh = req/s ÷ {ref_label} (unary) at the same concurrency. CPU: seconds of CPU "
             "(utime + stime) per 1,000 requests for each server process; peak RSS = VmHWM (MB, summed over a "
             "setup's processes).", "",
             "| setup | mode | concurrency | req/s | p50 ms | p99 ms | vs infermesh | server CPU s / 1k req "
             "| peak RSS MB | client CPU s / 1k req |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    if res["engine"]:
        b = max(res["engine"], key=lambda r: r["samples_per_s"])
        lines.append(f"| ONNX Runtime in-process, best batch ({b['batch']}) | in-process | – | "
                     f"{b['samples_per_s']:.0f} rows/s | {b['p50_ms']:.3f} per batch | {b['p99_ms']:.3f} per batch | "
                     f"| {b['cpu_s_per_1k']:.3f} (per 1k rows) | {b['hwm_mb']:.0f} | |")
    for r in rows:
        base = ref.get(r["concurrency"])
        ratio = f"{r['rps'] / base['rps']:.2f}×" if base and base["rps"] else ""
        client = f"{r['client_cpu_s'] * 1000 / r['ok']:.3f}" if r["ok"] else ""
        errs = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(f"| {r['setup']} | {r['mode']} | {r['concurrency']} | {r['rps']:.0f}{errs} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {ratio} | {_fmt_roles(r['server'], 'cpu_s_per_1k', 3)} | "
                     f"{_fmt_roles(r['server'], 'hwm_mb', 0)} | {client} |")
    if res["engine"]:
        lines += ["", "ONNX Runtime alone, all batch sizes: " + ", ".join(
            f"{r['batch']}: {r['samples_per_s']:.0f} rows/s" for r in res["engine"])]
    lines += _against_baseline(rows)
    t = _targets(res)
    if t:
        lines += ["", "Against the issue's targets:", ""] + [f"- {x}" for x in t]
    diffs = {k: v for k, v in res.get("answers", {}).items() if k != "reference"}
    if diffs:
        lines += ["", f"Same work everywhere: each setup's output for the input is the first one's within "
                      f"{max(diffs.values()):.1e} (largest difference; {len(diffs)} setups checked)."]
    for c in res["crosscheck"]:
        lines += ["", f"Cross-check, {c['setup']}, {c['mode']}, concurrency {c['concurrency']}:", "",
                  "| client | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
        for name in ("infermesh_bench", "perf_analyzer"):
            x = c[name]
            lines.append(f"| {name.replace('_', ' ')} | " + (f"{x['rps']:.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} |"
                                                             if "rps" in x else f"failed: {x['error'][-200:]!r} | | |"))
    if res["failed"]:
        lines += ["", "Failed setups:", ""] + [f"- {k}: {v[:500]}" for k, v in res["failed"].items()]
    lines += ["", "Configuration:", ""] + [f"- {x}" for x in res.get("config", [])]
    return "\n".join(lines) + "\n"
