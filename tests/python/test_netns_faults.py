"""Network faults on real separate network stacks: three workers, each in a network
namespace of its own, and the gateway with its clients in another, joined by veth pairs
(10.231.N.0/30, addresses that exist only inside these namespaces). Under load with 5 s
deadlines, one worker is faulted for 3 s: its link blackholed (iptables DROP both ways,
nothing answered, nothing reset), its connections reset (REJECT with tcp-reset), or its
process stopped (SIGSTOP: alive, connection open, silent); and one worker behind a link
that adds 50 ms each way (a userspace delay proxy: netem is not available here). Clients see no failure, and after the fault heals the worker gets traffic
again. Counts only, never timings. Needs root (ip netns); in CI (CI=true) a missing
permission fails rather than skips. iptables comes from Debian's package unpacked into
.cache (scripts/iptables.sh)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import MODELS, ROOT, binary

CLIENT = str(ROOT / "tests" / "python" / "fault_client.py")
DELAY_PROXY = str(ROOT / "tests" / "python" / "delay_proxy.py")
SLOW_MS = 50
IPTABLES = str(ROOT / "scripts" / "iptables.sh")
WORKERS = 3
PORT = 8001


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check)


class Mesh:
    """The namespaces, links and processes of one test; `close()` removes them all."""

    def __init__(self, slow_last=False):
        """`slow_last`: the last worker is reached through a link that adds 50 ms each way."""
        self.tag = f"imf{os.getpid() % 100000}"
        self.gw = f"{self.tag}-gw"
        self.procs, self.namespaces = [], []
        try:
            self.netns(self.gw)
        except subprocess.CalledProcessError as e:
            why = f"cannot create network namespaces here: {e.stderr.strip()}"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
        sh("ip", "-n", self.gw, "link", "set", "lo", "up")
        self.workers = []
        for i in range(1, WORKERS + 1):
            ns = self.netns(f"{self.tag}-w{i}")
            a, b = f"{self.tag}g{i}", f"{self.tag}w{i}"
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", self.gw)
            sh("ip", "link", "set", b, "netns", ns)
            sh("ip", "-n", self.gw, "addr", "add", f"10.231.{i}.1/30", "dev", a)
            sh("ip", "-n", self.gw, "link", "set", a, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.231.{i}.2/30", "dev", b)
            sh("ip", "-n", ns, "link", "set", b, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            addr = f"10.231.{i}.2"
            proc = self.start(ns, [binary("infermesh-worker"), "--model-repository", str(MODELS),
                                   "--grpc-address", addr, "--grpc-port", str(PORT), "--allow-metrics", "false",
                                   "--intra-op-threads", "1", "--threads", "1", "--shutdown-grace", "0s"])
            self.workers.append((f"{addr}:{PORT}", proc))
        listed = [w for w, _ in self.workers]
        if slow_last:
            ns, addr = f"{self.tag}-w{WORKERS}", f"10.231.{WORKERS}.2"
            self.start(ns, [sys.executable, DELAY_PROXY, f"{addr}:{PORT + 1}", f"{addr}:{PORT}", str(SLOW_MS)])
            listed[-1] = f"{addr}:{PORT + 1}"
        self.url = f"127.0.0.1:{PORT}"
        self.start(self.gw, [binary("infermesh-gateway"), "--workers", ",".join(listed),
                             "--grpc-address", "127.0.0.1", "--grpc-port", str(PORT), "--allow-metrics", "false",
                             "--threads", "1", "--shutdown-grace", "0s"])
        for w in listed:
            self.client("ready", w)
        self.client("ready", self.url)

    def netns(self, name):
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        return name

    def start(self, ns, cmd):
        # `ip netns exec` execs the command: the pid is the server's own.
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def client(self, *args, background=False):
        cmd = ["ip", "netns", "exec", self.gw, sys.executable, CLIENT, *args]
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout) if out.stdout.strip() else None

    def executions(self):
        return self.client("stats", *[w for w, _ in self.workers])

    def iptables(self, *args):
        sh("ip", "netns", "exec", self.gw, IPTABLES, *args)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.namespaces:  # the veth pairs go with their namespaces
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def mesh():
    m = Mesh()
    try:
        yield m
    finally:
        m.close()


def under_load(mesh, fault, heal, seconds=9):
    """Load for `seconds` with a 3 s fault in its middle; returns the client's counts."""
    client = mesh.client("load", mesh.url, str(seconds), "6", background=True)
    time.sleep(2)  # pacing the fault inside the load, not waiting for a condition
    fault()
    time.sleep(3)  # the fault's length
    heal()
    out, _ = client.communicate(timeout=seconds + 60)
    return json.loads(out)


def comes_back(mesh, i):
    """The healed worker gets requests again (bounded)."""
    before = mesh.executions()[i]
    deadline = time.monotonic() + 60
    while mesh.executions()[i] == before:
        assert time.monotonic() < deadline, f"worker {i + 1} never got traffic again"
        assert mesh.client("load", mesh.url, "1", "4")["failed"] == 0


def test_a_blackholed_worker_costs_no_request_and_returns(mesh):
    addr = "10.231.1.2"
    drop = [("-A", "OUTPUT", "-d", addr), ("-A", "INPUT", "-s", addr)]
    counts = under_load(mesh, lambda: [mesh.iptables(*r, "-j", "DROP") for r in drop],
                        lambda: mesh.iptables("-F"))
    assert counts["sent"] > 100 and counts["failed"] == 0, counts
    comes_back(mesh, 0)


def test_a_stopped_worker_costs_no_request_and_returns(mesh):
    proc = mesh.workers[1][1]
    counts = under_load(mesh, lambda: proc.send_signal(signal.SIGSTOP), lambda: proc.send_signal(signal.SIGCONT))
    assert counts["sent"] > 100 and counts["failed"] == 0, counts
    comes_back(mesh, 1)


def test_a_worker_that_resets_connections_costs_no_request_and_returns(mesh):
    addr = "10.231.1.2"
    reject = [("-A", "OUTPUT", "-d", addr, "-p", "tcp"), ("-A", "INPUT", "-s", addr, "-p", "tcp")]
    counts = under_load(mesh, lambda: [mesh.iptables(*r, "-j", "REJECT", "--reject-with", "tcp-reset")
                                       for r in reject],
                        lambda: mesh.iptables("-F"))
    assert counts["sent"] > 100 and counts["failed"] == 0, counts
    comes_back(mesh, 0)


def test_a_slow_link_costs_no_request_and_gets_less_traffic():
    mesh = Mesh(slow_last=True)
    try:
        before = mesh.executions()
        counts = mesh.client("load", mesh.url, "6", "6")
        assert counts["sent"] > 100 and counts["failed"] == 0, counts
        served = [a - b for a, b in zip(mesh.executions(), before)]
        # Busy, not broken: the slow worker still serves, and the balancer sends it less.
        assert 0 < served[-1] < min(served[:-1]), served
    finally:
        mesh.close()
