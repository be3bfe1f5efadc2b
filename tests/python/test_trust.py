"""Admission on every call and port, against real worker and gateway processes with a raw
HTTP/2 client where a well-behaved one cannot misbehave: small calls that declare
megabytes, the health port's own limits, handshakes that never end, connections that
never call, and a tenant that trickles its share while another is served."""
import socket
import threading
import time

import h2.events
import h2.settings
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

import grpc
from conftest import HOSTILE, Gateway, Worker
from test_connections import MiB, connect, grpc_status, read_until, rss

HEALTH = "/grpc.health.v1.Health"


def call_headers(path, token=None):
    h = [(":method", "POST"), (":scheme", "http"), (":authority", "infermesh"), (":path", path),
         ("content-type", "application/grpc"), ("te", "trailers")]
    return h + ([("authorization", f"Bearer {token}")] if token else [])


def serving(url, within=10):
    """Whether health "" at `url` says SERVING within `within` seconds (polled: a gateway's
    health follows its pool a moment after start)."""
    deadline = time.monotonic() + within
    with grpc.insecure_channel(url) as ch:
        while True:
            got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            if got.status == health_pb2.HealthCheckResponse.SERVING:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pair():
    w = Worker("--model-repository", str(HOSTILE), "--grpc-handshake-timeout", "1s")
    g = Gateway(w, extra=("--grpc-handshake-timeout", "1s"))
    yield g, w
    assert g.stop() == 0
    assert w.stop() == 0


def ports(pair):
    g, w = pair
    return [("gateway", g, g.url), ("gateway health port", g, g.health_url),
            ("worker", w, w.url), ("worker health port", w, w.health_url)]


@pytest.mark.parametrize("path", [f"{HEALTH}/Check", "/inference.GRPCInferenceService/ModelMetadata",
                                  "/inference.GRPCInferenceService/RepositoryIndex"])
def test_small_calls_declaring_megabytes_are_refused_at_their_prefix(pair, path):
    """70 calls each declaring 4 MiB and sending 4 KiB of it (unauthenticated): every one
    is refused RESOURCE_EXHAUSTED at once, memory stays flat, and probes still answer."""
    for name, server, url in ports(pair):
        if "health port" in name and not path.startswith(HEALTH):
            continue
        before = rss(server)
        conns, answered = [], 0
        for _ in range(5):  # 14 calls per connection: within the health port's stream limit
            s, c = connect(url)
            ids = [1 + 2 * i for i in range(14)]
            for i in ids:
                c.send_headers(i, call_headers(path))
                c.send_data(i, b"\0" + (4 * MiB).to_bytes(4, "big") + b"\0" * (4 << 10))
            s.sendall(c.data_to_send())
            events = read_until(s, c, lambda ev: all(grpc_status(ev, i) for i in ids) or "closed" in ev)
            codes = [grpc_status(events, i)[0] for i in ids]
            assert codes == [8] * len(ids), (name, codes, grpc_status(events, ids[0]))
            answered += len(ids)
            conns.append(s)
        grown = rss(server) - before
        print(f"\n{name} {path}: {answered} refused, grew {grown / MiB:.1f} MiB")
        assert grown < 16 * MiB, f"{name}: grew {grown / MiB:.0f} MiB"
        for s in conns:
            s.close()
        assert serving(server.health_url)


def test_the_health_port_advertises_and_enforces_a_stream_limit(pair):
    for name, _, url in ports(pair):
        if "health port" not in name:
            continue
        s, c = connect(url)
        events = read_until(s, c, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
        settings = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
        limit = settings.changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value
        assert limit == 16, (name, limit)
        # Ignore it, as a hostile client would: 40 Watch streams on one connection.
        c.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = __import__(
            "collections").deque([1000])
        body = health_pb2.HealthCheckRequest(service="").SerializeToString()
        ids = [1 + 2 * i for i in range(40)]
        for i in ids:
            c.send_headers(i, call_headers(f"{HEALTH}/Watch"))
            c.send_data(i, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        s.sendall(c.data_to_send())
        events = read_until(s, c, lambda ev: sum(isinstance(e, h2.events.StreamReset) for e in ev) >= 24
                            or "closed" in ev)
        reset = sorted(e.stream_id for e in events if isinstance(e, h2.events.StreamReset))
        assert reset == ids[16:], (name, reset)
        s.close()


def closed_within(s, seconds):
    """Whether the server closes `s` within `seconds` (whatever it sends first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not s.recv(4096):
                return True
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True
    return False


def half_settings(url):
    """The client preface and a SETTINGS header announcing 6 bytes that never come."""
    host, port = url.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 6, 4, 0, 0, 0, 0, 0]))
    return s


def test_half_settings_and_silent_connections_are_closed_at_the_handshake_timeout(pair):
    for name, _, url in ports(pair):
        half = [half_settings(url) for _ in range(5)]
        # A complete handshake and then nothing: no call within the timeout.
        silent, c = connect(url)
        read_until(silent, c, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
        for s in half + [silent]:
            assert closed_within(s, 10), f"{name}: a connection was held past --grpc-handshake-timeout 1s"
            s.close()


def test_the_probe_answers_while_the_main_ports_connections_are_full(tmp_path):
    w = Worker("--model-repository", str(HOSTILE), "--max-connections", "20", "--grpc-handshake-timeout", "2s")
    try:
        w.client.close()  # its connection would hold one of the 20
        held = [half_settings(w.url) for _ in range(20)]
        # The main port is full: one more connection is closed at once...
        extra = half_settings(w.url)
        assert closed_within(extra, 1.5)
        # ...while the health port, with limits of its own, answers.
        assert serving(w.health_url)
        for s in held:
            assert closed_within(s, 10)
            s.close()
        # Once the handshake timeout freed them, the main port serves again.
        assert serving(w.url)
    finally:
        w.client = grpcclient.InferenceServerClient(w.url)
        assert w.stop() == 0


def test_the_health_port_caps_connections_per_peer():
    w = Worker("--model-repository", str(HOSTILE), "--health-max-connections-per-peer", "4")
    try:
        host, port = w.health_url.rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        extra = socket.create_connection((host, int(port)), timeout=10)
        assert closed_within(extra, 5), "a fifth connection from one address is closed at once"
        for s in held[:1]:
            s.close()
        deadline = time.monotonic() + 10
        while True:  # the freed slot is taken again
            try:
                if serving(w.health_url):
                    break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for s in held[1:]:
            s.close()
    finally:
        assert w.stop() == 0


def hasty(url, model, x, stop, deadlines, count=None):
    """Calls `model` with `x` under each of `deadlines` (seconds) in turn until `stop` is
    set; its own failures (DEADLINE_EXCEEDED) are expected and ignored."""
    c = grpcclient.InferenceServerClient(url)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            c.infer(model, [x], client_timeout=deadlines[n % len(deadlines)])
        except Exception:  # noqa: BLE001 - DEADLINE_EXCEEDED is theirs to get
            pass
        if count:
            count()
    c.close()


def test_the_ejection_counter_ignores_attempts_cut_by_short_client_deadlines(tmp_path):
    """Callers with 2-5 ms deadlines on a model that takes 2 ms, beside a good client with
    none: half of such a deadline is below the worker's own attempt bound (200 ms at
    least), so the short callers may fail, the good one never does, and no worker is
    ejected."""
    (tmp_path / "slow" / "1").mkdir(parents=True)
    (tmp_path / "slow" / "config.pbtxt").write_text(
        'backend: "identity"\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'parameters { key: "delay_ms" value: { string_value: "2" } }\n')
    workers = [Worker("--model-repository", str(tmp_path)) for _ in range(2)]
    g = Gateway(*workers)
    try:
        x = grpcclient.InferInput("INPUT0", [4], "FP32")
        x.set_data_from_numpy(np.ones(4, np.float32))
        stop, failures = threading.Event(), []

        threads = [threading.Thread(target=hasty, args=(g.url, "slow", x, stop, [0.002, 0.003, 0.005]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        good = grpcclient.InferenceServerClient(g.url)
        for _ in range(400):
            try:
                assert good.infer("slow", [x]).as_numpy("OUTPUT0").tolist() == [1, 1, 1, 1]
            except Exception as e:  # noqa: BLE001
                failures.append(str(e))
        stop.set()
        for t in threads:
            t.join()
        good.close()
        import urllib.request
        text = urllib.request.urlopen(f"http://{g.metrics_url}/metrics", timeout=10).read().decode()
        ejections = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("infermesh_gateway_ejections_total"))
        assert ejections == 0, [line for line in text.splitlines() if "ejections" in line]
        assert failures == [], failures[:3]
    finally:
        assert g.stop() == 0
        for w in workers:
            assert w.stop() == 0
