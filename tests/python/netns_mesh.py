"""Workers, a front (the infermesh gateway or nginx grpc_pass) and its clients on real
separate network stacks: each worker in a network namespace of its own, the front and
its clients in another, joined by veth pairs (10.231.N.0/30, addresses that exist only
inside these namespaces). Used by tests/python/test_netns_faults.py and by
bench/netns_faults.py. Needs root (ip netns); iptables, dnsmasq and nginx come from
Debian's packages unpacked into .cache (scripts/iptables.sh, scripts/dnsmasq.sh,
scripts/debian-local.sh)."""
import json
import os
import signal
import subprocess
import sys
import tempfile

from conftest import MODELS, ROOT, binary

CLIENT = str(ROOT / "tests" / "python" / "fault_client.py")
DELAY_PROXY = str(ROOT / "tests" / "python" / "delay_proxy.py")
IPTABLES = str(ROOT / "scripts" / "iptables.sh")
DNSMASQ = str(ROOT / "scripts" / "dnsmasq.sh")
WORKERS = 3
PORT = 8001
METRICS_PORT = 8002
DNS_NAME = "workers.infermesh.test"


class NoNamespaces(Exception):
    """This machine does not let us create network namespaces (not root, or no netns)."""


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=check)


def nginx_conf(d, workers):
    """nginx grpc_pass at its defaults (no upstream keepalive, proxy timeouts 60 s,
    max_fails 1, fail_timeout 10 s); one access-log line per request with the time it
    ended, how long it took and the workers it tried."""
    servers = " ".join(f"server {w};" for w in workers)
    return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  log_format faults '$msec $request_time "$upstream_addr" $status';
  access_log {d}/access.log faults;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream workers {{ {servers} }}
  server {{
    listen 127.0.0.1:{PORT} http2;
    location / {{ grpc_pass grpc://workers; }}
  }}
}}
"""


class Mesh:
    """The namespaces, links and processes of one run; `close()` removes them all.

    front: "infermesh" (the gateway) or "nginx" (grpc_pass at its defaults).
    slow_last: the last worker is reached through a delay proxy adding `slow_ms` each way
      (`later_ms`: the delay it switches to on `turn_slow()`).
    dns: the gateway follows a name that a dnsmasq in the front's namespace answers,
      listing the first two workers (nginx, which resolves names once at start, gets
      those two addresses).
    metrics: the gateway serves its metrics on 127.0.0.1:8002 in the front's namespace.
    """

    def __init__(self, front="infermesh", slow_last=False, slow_ms=50, later_ms=None, dns=False,
                 metrics=False, release=False):
        self.tag = f"imf{os.getpid() % 100000}"
        self.gw = f"{self.tag}-gw"
        self.procs, self.namespaces = [], []
        self.work = tempfile.mkdtemp(prefix="infermesh-netns-")
        self.release = release
        self.proxy = self.dns = None
        try:
            self.netns(self.gw)
        except subprocess.CalledProcessError as e:
            raise NoNamespaces(f"cannot create network namespaces here: {e.stderr.strip()}") from e
        try:
            self.build(front, slow_last, slow_ms, later_ms, dns, metrics)
        except BaseException:
            self.close()
            raise

    def bin(self, name):
        if self.release:
            return str(ROOT / "target" / "release" / name)
        return binary(name)

    def build(self, front, slow_last, slow_ms, later_ms, dns, metrics):
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
            proc = self.start(ns, [self.bin("infermesh-worker"), "--model-repository", str(MODELS),
                                   "--grpc-address", addr, "--grpc-port", str(PORT), "--allow-metrics", "false",
                                   "--intra-op-threads", "1", "--threads", "1", "--shutdown-grace", "0s"])
            self.workers.append((f"{addr}:{PORT}", proc))
        # What the front dials: the workers' own addresses, or the delay proxy's.
        self.listed = [w for w, _ in self.workers]
        if slow_last:
            ns, addr = f"{self.tag}-w{WORKERS}", f"10.231.{WORKERS}.2"
            extra = [str(later_ms)] if later_ms is not None else []
            self.proxy = self.start(ns, [sys.executable, DELAY_PROXY, f"{addr}:{PORT + 1}", f"{addr}:{PORT}",
                                         str(slow_ms), *extra])
            self.listed[-1] = f"{addr}:{PORT + 1}"
        self.url = f"127.0.0.1:{PORT}"
        self.metrics_url = f"http://127.0.0.1:{METRICS_PORT}/metrics" if metrics and front == "infermesh" else None
        for w in self.listed:
            self.client("ready", w)
        front_workers = self.listed[:2] if dns else self.listed
        if front == "nginx":
            self.start_nginx(front_workers)
        else:
            if dns:
                self.start_dns(front_workers)
                where = ["--workers-dns", f"{DNS_NAME}:{PORT}", "--dns-server", "127.0.0.1:53"]
            else:
                where = ["--workers", ",".join(front_workers)]
            scrape = (["--metrics-address", "127.0.0.1", "--metrics-port", str(METRICS_PORT)] if self.metrics_url
                      else ["--allow-metrics", "false"])
            self.start(self.gw, [self.bin("infermesh-gateway"), *where, "--grpc-address", "127.0.0.1",
                                 "--grpc-port", str(PORT), *scrape, "--threads", "1", "--shutdown-grace", "0s"])
        self.client("ready", self.url)

    def start_nginx(self, workers):
        d = os.path.join(self.work, "nginx")
        os.makedirs(d)
        os.chmod(self.work, 0o755)
        os.chmod(d, 0o777)  # its workers drop to nobody and write temp files here
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(d, workers))
        exe = os.path.join(sh(str(ROOT / "scripts" / "debian-local.sh"), "nginx").stdout.strip(), "usr/sbin/nginx")
        self.access_log = os.path.join(d, "access.log")
        self.start(self.gw, [exe, "-c", conf, "-p", d, "-e", os.path.join(d, "error.log"), "-g", "daemon off;"])

    def start_dns(self, workers):
        self.hosts = os.path.join(self.work, "hosts")
        self.set_dns(workers, reload=False)
        self.dns = self.start(self.gw, [DNSMASQ, "-k", "--user=root", "--port=53", "--listen-address=127.0.0.1",
                                        "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts}",
                                        "--log-facility=-", f"--pid-file={self.work}/dnsmasq.pid"])

    def set_dns(self, workers, reload=True):
        """The name now lists these workers (host:port; the port stays PORT)."""
        with open(self.hosts, "w") as f:
            f.writelines(f"{w.rsplit(':', 1)[0]} {DNS_NAME}\n" for w in workers)
        if reload:
            self.dns.send_signal(signal.SIGHUP)

    def stop_dns(self):
        self.dns.terminate()
        self.dns.wait(timeout=30)

    def turn_slow(self):
        self.proxy.send_signal(signal.SIGUSR1)

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
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout) if out.stdout.strip() else None

    def executions(self):
        return self.client("stats", *[w for w, _ in self.workers])

    def iptables(self, *args):
        sh("ip", "netns", "exec", self.gw, IPTABLES, *args)

    def close(self):
        # Links open again first, so that every process can close its connections and exit
        # at once instead of waiting out its drain timeout.
        if self.namespaces:
            sh("ip", "netns", "exec", self.gw, IPTABLES, "-F", check=False)
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
        self.namespaces = []
        subprocess.run(["rm", "-rf", self.work], check=False)
