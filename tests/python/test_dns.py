"""DNS discovery for real: dnsmasq on a high loopback port answers several A records for
one name (as a Kubernetes headless Service does); workers listen on 127.0.0.2-4. Adding
and removing records (edit + SIGHUP) moves traffic; a resolver outage keeps it flowing."""
import json
import os
import signal
import socket
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
    dnsmasq_exe = dnsmasq()
    port = free_port("127.0.0.2")
    workers = {}
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        proc = subprocess.Popen(
            [binary("infermesh-worker"), "--model-repository", str(MODELS), "--grpc-address", ip,
             "--grpc-port", str(port), "--allow-metrics", "false", "--intra-op-threads", "1",
             "--shutdown-grace", "0s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers[ip] = proc
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")
    dns_port = free_port(kind=socket.SOCK_DGRAM)
    dns = subprocess.Popen([dnsmasq_exe, "-k", "--user=root", f"--port={dns_port}", "--listen-address=127.0.0.1",
                            "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                            "--log-facility=-", f"--pid-file={tmp_path}/dnsmasq.pid"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = None
    try:
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
        if dns.poll() is None:
            dns.terminate()
        for p in workers.values():
            p.terminate()
            p.wait(timeout=30)
