"""DNS discovery for real: dnsmasq on a high loopback port answers several A records for
one name (as a Kubernetes headless Service does); workers listen on 127.0.0.2-4. Adding
and removing records (edit + SIGHUP) moves traffic; a resolver outage keeps it flowing."""
import json
import os
import signal
import socket
import struct
import subprocess
import time

import numpy as np
import tritonclient.grpc as grpcclient

from conftest import MODELS, ROOT, Server, binary

NAME = "workers.infermesh.test"


def free_port(host="127.0.0.1", kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def executions(url):
    c = grpcclient.InferenceServerClient(url)
    return c.get_inference_statistics("digits").model_stats[0].execution_count


def infer(client, n):
    s = json.loads((MODELS / "digits/samples.json").read_text())
    x = np.array(s["inputs"][:1], dtype=np.float32)
    for _ in range(n):
        i = grpcclient.InferInput("input", [1, 64], "FP32")
        i.set_data_from_numpy(x)
        client.infer("digits", [i])


def dnsmasq():
    """Debian's dnsmasq unpacked into .cache by scripts/dnsmasq.sh (nothing installed
    system-wide), or the one INFERMESH_DNSMASQ names. Run once here so that a failed
    download or a missing library shows up as such, not as a gateway without workers."""
    exe = os.environ.get("INFERMESH_DNSMASQ") or str(ROOT / "scripts" / "dnsmasq.sh")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{exe} --version: {out.stdout[-1000:]}{out.stderr[-2000:]}"
    return exe


def test_dns_discovery_follows_records_and_survives_an_outage(tmp_path):
    port = free_port("127.0.0.2")
    workers = {}
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        proc = subprocess.Popen(
            [binary("infermesh-worker"), "--model-repository", str(MODELS), "--grpc-address", ip,
             "--grpc-port", str(port), "--health-port", "0", "--allow-metrics", "false", "--intra-op-threads", "1",
             "--shutdown-grace", "0s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers[ip] = proc
    hosts = tmp_path / "hosts"
    dns = gateway = None
    try:
        dns, dns_port = start_dns(tmp_path, f"127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")
        for ip in workers:
            c = grpcclient.InferenceServerClient(f"{ip}:{port}")
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.is_server_ready():
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, f"worker {ip} not ready"
                time.sleep(0.05)
        gateway = Server([binary("infermesh-gateway"), "--workers-dns", f"{NAME}:{port}",
                          "--dns-server", f"127.0.0.1:{dns_port}", "--dns-refresh", "200ms",
                          "--worker-refresh", "200ms"])
        url = lambda ip: f"{ip}:{port}"  # noqa: E731
        before = {ip: executions(url(ip)) for ip in workers}
        infer(gateway.client, 60)
        after = {ip: executions(url(ip)) for ip in workers}
        delta = {ip: after[ip] - before[ip] for ip in workers}
        assert delta["127.0.0.4"] == 0, delta
        assert delta["127.0.0.2"] > 0 and delta["127.0.0.3"] > 0, delta

        # Move the name: drop .2, add .4, and tell dnsmasq to reread its hosts file.
        hosts.write_text(f"127.0.0.3 {NAME}\n127.0.0.4 {NAME}\n")
        dns.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while executions(url("127.0.0.4")) == after["127.0.0.4"]:
            assert time.monotonic() < deadline, "traffic never reached the added worker"
            infer(gateway.client, 5)
        removed = executions(url("127.0.0.2"))
        infer(gateway.client, 60)
        assert executions(url("127.0.0.2")) == removed, "the removed worker still gets traffic"

        # Resolver outage: the last good set keeps serving.
        dns.terminate()
        dns.wait(timeout=10)
        infer(gateway.client, 60)
    finally:
        if gateway:
            assert gateway.stop() == 0
        if dns and dns.poll() is None:
            dns.terminate()
        for p in workers.values():
            p.terminate()
            p.wait(timeout=30)


def dns_query(name):
    """A minimal DNS query (id 0x1234, recursion desired, one A question)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)


def start_dns(tmp_path, hosts_text, *extra):
    """dnsmasq answering from a hosts file; returns (process, port) once it answers a
    query. The port is picked free for UDP only and dnsmasq also binds it for TCP, so a
    start that loses that race (dnsmasq exits) is tried again on another port."""
    hosts = tmp_path / "hosts"
    hosts.write_text(hosts_text)
    exe = dnsmasq()
    for attempt in range(5):
        port = free_port(kind=socket.SOCK_DGRAM)
        log = open(tmp_path / f"dnsmasq-{attempt}.log", "w")
        proc = subprocess.Popen([exe, "-k", "--user=root", f"--port={port}", "--listen-address=127.0.0.1",
                                 "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                                 "--log-facility=-", f"--pid-file={tmp_path}/dnsmasq.pid", *extra],
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while proc.poll() is None and time.monotonic() < deadline:
                s.sendto(dns_query(NAME), ("127.0.0.1", port))
                try:
                    s.recvfrom(4096)
                    return proc, port
                except OSError:  # no answer yet (timeout) or nothing bound there yet (refused)
                    pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    raise AssertionError(f"dnsmasq never answered: {(tmp_path / f'dnsmasq-{attempt}.log').read_text()[-2000:]}")


def gateway_workers(args, want, timeout=30):
    """Starts a gateway (which need not become ready), waits until its metrics list `want`
    workers, and returns the set of worker addresses it knows."""
    import re
    import urllib.request

    proc = subprocess.Popen([binary("infermesh-gateway"), *args, "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--health-port", "0",
                             "--metrics-address", "127.0.0.1", "--metrics-port", "0", "--log-format", "json",
                             "--dns-refresh", "200ms", "--worker-refresh", "1h", "--shutdown-grace", "0s"],
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = None
        for line in proc.stderr:
            fields = json.loads(line).get("fields", {}) if line.startswith("{") else {}
            if fields.get("metrics"):
                metrics = fields["metrics"]
                break
        assert metrics, "gateway did not log its metrics address"
        import threading
        threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
            known = set(re.findall(r'^infermesh_gateway_worker_ready\{worker="([^"]+)"\}', text, re.M))
            if len(known) >= want or time.monotonic() > deadline:
                return known
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_large_answer_is_seen_whole(tmp_path):
    """60 A records (about 1 KiB) do not fit the classic 512-byte UDP answer: dnsmasq is
    told to truncate at 512 bytes, so the resolver must ask again over TCP."""
    ips = [f"127.0.1.{i}" for i in range(1, 61)]
    dns, dns_port = start_dns(tmp_path, "".join(f"{ip} {NAME}\n" for ip in ips), "--edns-packet-max=512")
    try:
        known = gateway_workers(["--workers-dns", f"{NAME}:9", "--dns-server", f"127.0.0.1:{dns_port}"], 60)
        assert known == {f"{ip}:9" for ip in ips}, sorted(known)
    finally:
        dns.terminate()
        dns.wait(timeout=10)


def test_a_dual_stack_pod_is_one_worker_unless_asked(tmp_path):
    dns, dns_port = start_dns(tmp_path, f"127.0.0.2 {NAME}\n::1 {NAME}\n")
    try:
        args = ["--workers-dns", f"{NAME}:9", "--dns-server", f"127.0.0.1:{dns_port}"]
        assert gateway_workers(args, 1) == {"127.0.0.2:9"}
        assert gateway_workers([*args, "--dns-family", "any"], 2) == {"127.0.0.2:9", "[::1]:9"}
        assert gateway_workers([*args, "--dns-family", "ipv6"], 1) == {"[::1]:9"}
    finally:
        dns.terminate()
        dns.wait(timeout=10)


def test_srv_records_give_the_ports(tmp_path):
    port = free_port("127.0.0.2")
    worker = subprocess.Popen(
        [binary("infermesh-worker"), "--model-repository", str(MODELS), "--grpc-address", "127.0.0.2",
         "--grpc-port", str(port), "--health-port", "0", "--allow-metrics", "false", "--intra-op-threads", "1", "--shutdown-grace", "0s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"pod-a.{NAME}"
    dns, dns_port = start_dns(tmp_path, f"127.0.0.2 {target}\n", f"--srv-host=_grpc._tcp.{NAME},{target},{port},0,5")
    gateway = None
    try:
        gateway = Server([binary("infermesh-gateway"), "--workers-dns", NAME, "--dns-server", f"127.0.0.1:{dns_port}",
                          "--dns-refresh", "200ms", "--worker-refresh", "200ms"])
        infer(gateway.client, 3)
        assert executions(f"127.0.0.2:{port}") >= 3
    finally:
        if gateway:
            assert gateway.stop() == 0
        dns.terminate()
        dns.wait(timeout=10)
        worker.terminate()
        worker.wait(timeout=30)
