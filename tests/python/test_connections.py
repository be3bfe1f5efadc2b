"""Connection and memory limits against real worker and gateway processes (loopback,
bounded), driven by a raw HTTP/2 client where a well-behaved one cannot misbehave:
declared sizes, slow senders, half prefaces, too many streams, the fd limit."""
import collections
import os
import socket
import subprocess
import threading
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from conftest import HOSTILE, Gateway, Worker, binary

MiB = 1 << 20


def connect(url):
    host, port = url.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def headers(method):
    return [(":method", "POST"), (":scheme", "http"), (":authority", "infermesh"),
            (":path", f"/inference.GRPCInferenceService/{method}"),
            ("content-type", "application/grpc"), ("te", "trailers")]


def read_until(s, c, done, timeout=10):
    """Feeds the connection until `done(events)` is true; returns the events."""
    events, deadline = [], time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            continue
        if not data:
            events.append("closed")
            break
        events += c.receive_data(data)
        out = c.data_to_send()
        if out:
            s.sendall(out)
    return events


def grpc_status(events, stream_id):
    for e in events:
        if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and e.stream_id == stream_id:
            status = dict(e.headers).get("grpc-status")
            if status is not None:
                return int(status), dict(e.headers).get("grpc-message", "")
    return None


def rss(server):
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def infer_ok(server):
    x = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    x.set_data_from_numpy(np.ones((1, 3), np.float32))
    return server.client.infer("vec_fp32", [x]).as_numpy("OUTPUT0").tolist() == [[1, 1, 1]]


@pytest.fixture(scope="module")
def pair():
    """A worker and a gateway in front of it, each with a 64 MiB request budget."""
    yield from worker_and_gateway(
        "--max-inflight-bytes", str(64 * MiB), "--grpc-max-message-bytes", str(128 * MiB),
        "--grpc-stall-timeout", "2s", "--grpc-max-concurrent-streams", "8", "--grpc-handshake-timeout", "1s")


def worker_and_gateway(*flags):
    """(gateway, worker) with the same flags on both, stopped (exit 0) afterwards."""
    w = Worker("--model-repository", str(HOSTILE), *flags)
    g = Gateway(w, extra=flags)
    yield g, w
    assert g.stop() == 0
    assert w.stop() == 0


def test_a_declared_2gib_message_is_refused_at_once(pair):
    for server in pair:
        s, c = connect(server.url)
        c.send_headers(1, headers("ModelInfer"))
        c.send_data(1, b"\0" + (2**31 - 1).to_bytes(4, "big"))
        s.sendall(c.data_to_send())
        events = read_until(s, c, lambda ev: grpc_status(ev, 1) is not None or "closed" in ev)
        code, message = grpc_status(events, 1)
        assert code == 8, (code, message)  # RESOURCE_EXHAUSTED, with nothing more sent
        s.close()


def test_max_concurrent_streams_is_advertised_and_enforced(pair):
    for server in pair:
        s, c = connect(server.url)
        events = read_until(s, c, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
        settings = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
        limit = settings.changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value
        assert limit == 8
        # Ignore the limit as a hostile client would: open 12 streams and send nothing more.
        c.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = collections.deque([100])
        ids = [1 + 2 * i for i in range(12)]
        for i in ids:
            c.send_headers(i, headers("ModelStreamInfer"))
        s.sendall(c.data_to_send())
        events = read_until(s, c, lambda ev: sum(isinstance(e, h2.events.StreamReset) for e in ev) >= 4
                            or "closed" in ev)
        reset = sorted(e.stream_id for e in events if isinstance(e, h2.events.StreamReset))
        assert reset == ids[8:], reset
        s.close()
        assert infer_ok(server)


def test_half_preface_connections_are_closed_by_the_handshake_timeout(pair):
    for server in pair:
        host, port = server.url.rsplit(":", 1)
        socks = []
        for _ in range(50):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"PRI * HTTP/2.0\r\n")  # half of the 24-byte preface, then nothing
            socks.append(s)
        assert infer_ok(server), "served while they hang"
        deadline = time.monotonic() + 15
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while s.recv(4096):
                    pass  # the server's SETTINGS and GOAWAY may come first
            except ConnectionResetError:
                pass
            s.close()
        assert time.monotonic() < deadline


def poll(s, c, wait):
    """Events that arrive within `wait` seconds (none is fine)."""
    try:
        return read_until(s, c, lambda ev: len(ev) > 0, timeout=wait)
    except AssertionError:
        return []


def refused(events):
    return grpc_status(events, 1) is not None or "closed" in events or any(
        isinstance(e, h2.events.StreamReset) for e in events)


def test_slow_senders_hold_no_more_than_the_budget(pair):
    """8 calls each declaring 64 MB − 1 KiB and sending all but its last MiB, then
    stalling: the process grows by at most its budget (the rest are refused as they
    arrive), and once the stall timeout drops them, good requests succeed."""
    for server in pair:
        before = rss(server)
        size = 64_000_000 - 1024
        chunk = b"\0" * (1 << 16)
        conns = []
        for _ in range(8):
            s, c = connect(server.url)
            c.send_headers(1, headers("ModelInfer"))
            c.send_data(1, b"\0" + size.to_bytes(4, "big"))
            s.sendall(c.data_to_send())
            conns.append((s, c))
        n_refused = 0
        for s, c in conns:
            sent, deadline = 0, time.monotonic() + 60
            while sent < size - MiB:
                # A window that stays shut means the server stopped reading: held, not refused.
                if time.monotonic() > deadline:
                    break
                window = c.local_flow_control_window(1)
                if window <= 0:
                    if refused(poll(s, c, 2)):
                        n_refused += 1
                        break
                    continue
                n = min(window, len(chunk), size - MiB - sent, c.max_outbound_frame_size)
                try:
                    c.send_data(1, chunk[:n])
                    s.sendall(c.data_to_send())
                except Exception:  # noqa: BLE001 - the stream or connection was closed: refused
                    n_refused += 1
                    break
                sent += n
            else:
                if refused(poll(s, c, 0.2)):
                    n_refused += 1
        grown = rss(server) - before
        print(f"\nslow senders: {server.url} grew {grown / MiB:.0f} MiB, {n_refused} of 8 refused")
        assert grown <= 64 * MiB + 64 * MiB, f"grew {grown / MiB:.0f} MiB with a 64 MiB budget"
        assert n_refused >= 6, f"only {n_refused} of 8 refused"
        # The stall timeout (2 s) releases whatever is still held.
        deadline = time.monotonic() + 30
        while True:
            try:
                if infer_ok(server):
                    break
            except Exception:  # noqa: BLE001 - RESOURCE_EXHAUSTED until released
                assert time.monotonic() < deadline, "good requests never came back"
                time.sleep(0.1)
        for s, _ in conns:
            s.close()


def test_at_the_fd_limit_the_server_backs_off_and_keeps_serving(tmp_path):
    """With `ulimit -n` low, a flood of connections exhausts the fds: accept fails with
    EMFILE. The loop backs off (log lines a second, not millions), and calls on the
    connections already open keep working."""
    log = tmp_path / "worker.log"
    cmd = ["bash", "-c", 'ulimit -n 96; exec "$@"', "worker", binary("infermesh-worker"),
           "--model-repository", str(HOSTILE), "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--health-port", "0",
           "--allow-metrics", "false", "--log-format", "json", "--shutdown-grace", "0s"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stderr=out)
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None
            for line in log.read_text().splitlines():
                if '"address"' in line:
                    url = line.split('"address":"')[1].split('"')[0]
            time.sleep(0.05)
        channel = grpc.insecure_channel(url)
        client = grpcclient.InferenceServerClient(url)
        while not client.is_server_ready():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        host, port = url.rsplit(":", 1)
        flood = []
        for _ in range(200):
            try:
                flood.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        size_before = log.stat().st_size
        cpu_before = sum(int(x) for x in open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        time.sleep(2)  # measuring a rate over a fixed window, not synchronising
        cpu = sum(int(x) for x in open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[11:13]) - cpu_before
        grown = log.stat().st_size - size_before
        assert grown < 8 * 1024, f"log grew {grown} bytes in 2 s at the fd limit"
        assert cpu < 100, f"{cpu} ticks of CPU in 2 s: the accept loop spins"
        assert "accept failed" in log.read_text()
        # The connection already open still serves.
        x = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), np.float32))
        assert client.infer("vec_fp32", [x]).as_numpy("OUTPUT0").tolist() == [[1, 1]]
        for s in flood:
            s.close()
        client.close()
        channel.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def tight():
    """A worker and a gateway in front of it, each with a 32 MiB request budget."""
    yield from worker_and_gateway("--max-inflight-bytes", str(32 * MiB), "--grpc-max-concurrent-streams", "8")


def test_replies_nobody_reads_are_held_to_the_budget(tight):
    """A client that never opens its receive window: each 5 MiB reply stays counted in the
    32 MiB budget, so after 6 of them new calls are refused RESOURCE_EXHAUSTED instead of
    the process holding every reply; closing the connection frees them all."""
    for server in tight:
        before = rss(server)
        s, c = connect(server.url)
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        s.sendall(c.data_to_send())
        n, payload = 8, b"\0" * (5 * MiB)  # 8 calls: the server's stream limit
        req = service_pb2.ModelInferRequest(model_name="vec_fp32")
        t = req.inputs.add()
        t.name, t.datatype = "INPUT0", "FP32"
        t.shape.extend([1, len(payload) // 4])
        req.raw_input_contents.append(payload)
        body = req.SerializeToString()
        message = b"\0" + len(body).to_bytes(4, "big") + body
        ids = [1 + 2 * i for i in range(n)]
        events = []
        for i in ids:
            def answered_early(stream_id=i):
                return any(getattr(e, "stream_id", None) == stream_id and isinstance(
                    e, (h2.events.ResponseReceived, h2.events.StreamReset)) for e in events)

            deadline = time.monotonic() + 30
            try:
                c.send_headers(i, headers("ModelInfer"))
                sent = 0
                # A call refused while it arrives is answered before its body is done.
                while sent < len(message) and not answered_early():
                    assert time.monotonic() < deadline, f"stream {i}: no window and no answer"
                    window = min(c.local_flow_control_window(i), c.max_outbound_frame_size)
                    if window <= 0:
                        events += poll(s, c, 0.2)
                        continue
                    c.send_data(i, message[sent:sent + window])
                    s.sendall(c.data_to_send())
                    sent += window
                if not answered_early():
                    c.end_stream(i)
                    s.sendall(c.data_to_send())
            except h2.exceptions.StreamClosedError:
                pass  # refused while it arrived; its answer is among the events

        def answered(ev):
            done = {e.stream_id for e in ev if isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset))}
            return done >= set(ids)

        events += read_until(s, c, lambda ev: answered(events + ev), timeout=60)
        refused = len({e.stream_id for e in events
                       if (isinstance(e, h2.events.ResponseReceived) and dict(e.headers).get("grpc-status") == "8")
                       or isinstance(e, h2.events.StreamReset)})
        grown = rss(server) - before
        print(f"\nunread replies: {server.url} grew {grown / MiB:.0f} MiB, {refused} of {n} refused")
        assert refused >= 1, refused
        # Another client's call finds the budget taken by the unread replies.
        x = grpcclient.InferInput("INPUT0", [1, MiB], "FP32")
        x.set_data_from_numpy(np.zeros((1, MiB), np.float32))
        with pytest.raises(Exception) as e:
            server.client.infer("vec_fp32", [x])
        assert "RESOURCE_EXHAUSTED" in str(e.value), str(e.value)[:300]
        # Health keeps answering under that pressure: probes are never counted.
        with grpc.insecure_channel(server.url) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert grown <= 32 * MiB + 64 * MiB, f"grew {grown / MiB:.0f} MiB with a 32 MiB budget"
        s.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if infer_ok(server):
                    break
            except Exception:  # noqa: BLE001 - RESOURCE_EXHAUSTED until the replies are dropped
                assert time.monotonic() < deadline, "the budget never came back"
                time.sleep(0.1)


def test_idle_connections_are_closed_but_open_calls_keep_theirs():
    w = Worker("--model-repository", str(HOSTILE), "--grpc-idle-timeout", "1s",
               "--grpc-keepalive-time", "1s", "--grpc-keepalive-timeout", "1s")
    try:
        # No call at all: closed about a second after it went idle (keepalive is not use).
        idle, c1 = connect(w.url)
        start = time.monotonic()
        events = read_until(idle, c1, lambda ev: "closed" in ev or any(
            isinstance(e, h2.events.ConnectionTerminated) for e in ev), timeout=15)
        assert time.monotonic() - start >= 0.9, events
        # A stream left open and silent for longer keeps its connection and still answers.
        s, c = connect(w.url)
        c.send_headers(1, headers("ModelStreamInfer"))
        s.sendall(c.data_to_send())
        seen, until = [], time.monotonic() + 3  # an observation window: nothing may happen
        while time.monotonic() < until:
            seen += poll(s, c, until - time.monotonic())
        assert not any(e == "closed" or isinstance(e, h2.events.ConnectionTerminated) for e in seen), seen
        req = service_pb2.ModelInferRequest(model_name="vec_fp32", id="late")
        t = req.inputs.add()
        t.name, t.datatype = "INPUT0", "FP32"
        t.shape.extend([1, 1])
        req.raw_input_contents.append(b"\0\0\x80\x3f")
        body = req.SerializeToString()
        c.send_data(1, b"\0" + len(body).to_bytes(4, "big") + body)
        s.sendall(c.data_to_send())
        events = read_until(s, c, lambda ev: any(isinstance(e, h2.events.DataReceived) for e in ev), timeout=15)
        data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        answer = service_pb2.ModelStreamInferResponse.FromString(data[5:])
        assert answer.infer_response.id == "late" and not answer.error_message
        s.close()
        # A peer that stops answering PINGs (a dead host) loses its connection, open call or not.
        mute, cm = connect(w.url)
        cm.send_headers(1, headers("ModelStreamInfer"))
        mute.sendall(cm.data_to_send())
        pinged, closed, deadline = False, False, time.monotonic() + 15
        while not closed and time.monotonic() < deadline:
            mute.settimeout(1)
            try:
                data = mute.recv(1 << 16)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            closed = not data
            pinged |= any(isinstance(e, h2.events.PingReceived) for e in cm.receive_data(data)) if data else False
            cm.data_to_send()  # the PING ACKs h2 queued are never sent
        assert pinged and closed, (pinged, closed)
        mute.close()
    finally:
        assert w.stop() == 0
