"""What bench/peers.py measures with: server processes it owns (and always stops), CPU and
peak RSS read from /proc, and the two load generators (`infermesh bench` for gRPC, wrk for
HTTP/JSON). Standard library only, so any python3 runs it."""
import ctypes
import json
import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a server outlives nothing, even a SIGKILLed driver.
    _libc.prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on


def _starttime(pid: int) -> str | None:
    try:
        return _stat(pid)[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """pid and every process below it (uvicorn and nginx do their work in children)."""
    children: dict[int, list[int]] = {}
    for p in pathlib.Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                children.setdefault(int(_stat(int(p.name))[1]), []).append(int(p.name))
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_s(pid: int) -> float:
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / TICK  # utime + stime


def hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Procs:
    """Servers started for one setup; stop() ends each by its PID, children included."""

    def __init__(self, logdir: pathlib.Path):
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "w") as log:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent, **kw)
        self.started.append((name, p))
        return p

    def tail(self, name: str, n: int = 2000) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-n:]

    def check_alive(self) -> None:
        for name, p in self.started:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.tail(name)}")

    def stop(self) -> None:
        # Children recorded first (PID + start time), so one whose parent dies first still ends.
        trees = {p.pid: [(q, _starttime(q)) for q in descendants(p.pid)] if p.poll() is None else []
                 for _, p in self.started}
        for _, p in reversed(self.started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.started):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pid, start in trees[p.pid][1:]:
                if start is not None and _starttime(pid) == start:  # the same process, not a reused PID
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.started.clear()


class Meter:
    """CPU seconds and peak RSS of named server processes over one measured row."""

    def __init__(self, roles: dict[str, list[int]]):
        self.roles = roles
        self.before = {r: sum(cpu_s(p) for p in pids) for r, pids in roles.items()}

    def done(self, ok: int) -> dict:
        out = {}
        for role, pids in self.roles.items():
            cpu = sum(cpu_s(p) for p in pids) - self.before[role]
            out[role] = {"cpu_s": cpu, "cpu_s_per_1k": cpu * 1000 / ok if ok else None,
                         "hwm_mb": sum(hwm_mb(p) for p in pids)}
        return out


def run_measured(cmd: list[str], timeout: float) -> tuple[str, float, float]:
    """Runs a client; returns its stdout, its CPU seconds and its peak RSS in MB (wait4)."""
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                             preexec_fn=_die_with_parent)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            with p.stdout:
                out = p.stdout.read()
            _, status, ru = os.wait4(p.pid, 0)  # not p.wait(): wait4 also gives its rusage
            p.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            if p.returncode is None:
                p.kill()
                p.wait()
        if p.returncode != 0:
            err.seek(0)
            # The head: a panic or an error says why in its first line.
            raise RuntimeError(f"{' '.join(cmd[:3])} failed ({p.returncode}): {err.read()[:2000]}")
    return out, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def grpc_load(infermesh: str, url: str, model: str, concurrency: int, streaming: bool,
              seconds: float, input_arg: str) -> dict:
    cmd = [infermesh, "bench", "--url", url, "--model", model, "--input", input_arg,
           "--concurrency", str(concurrency), "--duration", f"{int(seconds * 1000)}ms", "--json"]
    out, cpu, _ = run_measured(cmd + (["--streaming"] if streaming else []), seconds + 60)
    r = json.loads(out)
    return {"ok": r["ok"], "errors": r["errors"], "errors_by_status": r["errors_by_status"],
            "seconds": r["seconds"], "rps": r["requests_per_s"], "p50_ms": r["p50_ms"],
            "p90_ms": r["p90_ms"], "p99_ms": r["p99_ms"], "max_ms": r["max_ms"], "client_cpu_s": cpu}


def http_load(url: str, concurrency: int, seconds: float, body: pathlib.Path, header_len: int | None = None,
              script: str = "wrk_post.lua", extra: tuple = ()) -> dict:
    # One wrk thread: the client shares the 2 cores with the server, so it stays cheap.
    cmd = [str(ROOT / "scripts/loadgen.sh"), "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "--latency", "-s", str(ROOT / "bench/peer_apps" / script), url, "--", str(body)]
    if header_len is not None:
        cmd.append(str(header_len))
    cmd += [str(x) for x in extra]
    out, cpu, _ = run_measured(cmd, seconds + 60)
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    r = json.loads(line.split(" ", 1)[1])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    ok = r["requests"] - r["status"]
    secs = r["duration_us"] / 1e6
    return {"ok": ok, "errors": errors,
            "errors_by_status": {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]},
            "seconds": secs, "rps": ok / secs, "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000, "client_cpu_s": cpu}


def wait_until(probe, what: str, procs: Procs, timeout: float = 90) -> None:
    """Polls probe() (bounded) until it returns true; a server that died fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        try:
            if probe():
                return
        except Exception:  # noqa: BLE001 - not up yet is any failure
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.2)
