"""Stateful models (Triton's sequence_batching) on the worker: implicit state kept per
sequence and batched across sequences, the control inputs, idle release, sequence slots
and Triton's errors — with Triton's own client and small generated ONNX models."""
import queue
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import test_sequences as sequences
from conftest import ROOT, Worker, wait_for
from test_placement import metric
from test_sequences import three_workers_and_a_gateway

sys.path.append(str(ROOT / "bench"))
from stateful_models import WIDTH, running_sums, write  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write(tmp_path_factory.mktemp("stateful"))


@pytest.fixture(scope="module")
def worker(repo):
    w = Worker("--model-repository", str(repo), "--intra-op-threads", "1")
    yield w
    assert w.stop() == 0


def inp(x, name="INPUT"):
    i = grpcclient.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def stream_sequences(client, model, chunks):
    """Sends every sequence's chunks on one stream, interleaved (step k of every sequence,
    then step k+1), and returns each sequence's outputs in order."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        steps = max(len(c) for c in chunks.values())
        sent = 0
        for k in range(steps):
            for seq, cs in chunks.items():
                if k < len(cs):
                    client.async_stream_infer(model, [inp(cs[k][None, :])], request_id=f"{seq}/{k}",
                                              sequence_id=seq, sequence_start=k == 0,
                                              sequence_end=k == len(cs) - 1)
                    sent += 1
        got = {seq: {} for seq in chunks}
        for _ in range(sent):
            result, error = answers.get(timeout=60)
            assert error is None, error
            seq, k = result.get_response().id.split("/")
            seq = int(seq) if seq.isdigit() else seq
            got[seq][int(k)] = result.as_numpy("OUTPUT")[0]
        return {seq: [outs[k] for k in sorted(outs)] for seq, outs in got.items()}
    finally:
        client.stop_stream()


def check_sums(chunks, got):
    for seq, cs in chunks.items():
        np.testing.assert_allclose(np.stack(got[seq]), np.stack(running_sums(cs)), rtol=1e-5,
                                   err_msg=f"sequence {seq}")


def test_fifty_interleaved_sequences_keep_their_own_state(worker):
    rng = np.random.RandomState(0)
    chunks = {seq: [rng.rand(WIDTH).astype(np.float32) for _ in range(rng.randint(3, 9))]
              for seq in range(1, 51)}
    before = worker.client.get_inference_statistics("accumulate").model_stats[0]
    got = stream_sequences(worker.client, "accumulate", chunks)
    check_sums(chunks, got)
    after = worker.client.get_inference_statistics("accumulate").model_stats[0]
    requests = after.inference_count - before.inference_count
    assert requests == sum(len(c) for c in chunks.values())
    assert after.execution_count - before.execution_count < requests, "sequences batched together"
    # Every sequence ended: no slot and no state held.
    assert metric(worker, "infermesh_sequences_active", model="accumulate") == 0
    assert metric(worker, "infermesh_sequences_state_bytes", model="accumulate") == 0
    assert metric(worker, "infermesh_sequences_ended_total", model="accumulate", how="end") >= 50


def test_direct_strategy_gives_the_same_answers(worker):
    rng = np.random.RandomState(1)
    chunks = {f"s-{n}": [rng.rand(WIDTH).astype(np.float32) for _ in range(5)] for n in range(12)}
    check_sums(chunks, stream_sequences(worker.client, "accumulate_direct", chunks))


def test_a_model_without_a_batch_dim_keeps_state_too(worker):
    outs = []
    for n, (start, end) in enumerate([(True, False), (False, False), (False, True)]):
        x = np.full(WIDTH, n + 1, np.float32)
        r = worker.client.infer("accumulate_unbatched", [inp(x)], sequence_id=900,
                                sequence_start=start, sequence_end=end)
        outs.append(r.as_numpy("OUTPUT").tolist())
    assert outs == [[1.0] * WIDTH, [3.0] * WIDTH, [6.0] * WIDTH]


def test_control_inputs_carry_start_end_ready_and_the_correlation_id(worker):
    c = worker.client

    def step(seq, x, **flags):
        r = c.infer("controlled", [inp(np.array([[x]], np.float32))], sequence_id=seq, **flags)
        return float(r.as_numpy("OUTPUT")[0, 0]), list(r.as_numpy("ECHO")[0])

    assert step(77, 1.0, sequence_start=True) == (1.0, [1, 0, 1, 77])
    assert step(77, 2.0) == (3.0, [0, 0, 1, 77])
    assert step(77, 4.0, sequence_end=True) == (7.0, [0, 1, 1, 77])
    # A one-request sequence: START and END together.
    assert step(78, 5.0, sequence_start=True, sequence_end=True) == (5.0, [1, 1, 1, 78])
    # A start for an id still active ends the old sequence early and starts afresh.
    step(79, 10.0, sequence_start=True)
    assert step(79, 1.0, sequence_start=True) == (1.0, [1, 0, 1, 79])
    assert step(79, 1.0, sequence_end=True)[0] == 2.0
    assert metric(worker, "infermesh_sequences_ended_total", model="controlled", how="restart") == 1
    # The worker's inputs are not the client's: metadata shows only INPUT.
    meta = c.get_model_metadata("controlled")
    assert [i.name for i in meta.inputs] == ["INPUT"]
    assert [o.name for o in meta.outputs] == ["OUTPUT", "ECHO"]


def error_of(call):
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value


def test_triton_errors(worker):
    c = worker.client
    x = inp(np.ones((1, WIDTH), np.float32))
    e = error_of(lambda: c.infer("accumulate", [x]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify a non-zero or non-empty correlation ID" in e.message()
    e = error_of(lambda: c.infer("accumulate", [x], sequence_id=4242))
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert ("inference request for sequence 4242 to model 'accumulate' must specify the START flag "
            "on the first request of the sequence") in e.message()
    two = inp(np.ones((2, WIDTH), np.float32))
    e = error_of(lambda: c.infer("accumulate", [two], sequence_id=1, sequence_start=True))
    assert "must specify batch-size 1" in e.message()
    e = error_of(lambda: c.infer("accumulate", [x, inp(np.ones((1, WIDTH), np.float32), "STATE_IN")],
                                 sequence_id=5, sequence_start=True))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "STATE_IN" in e.message()
    one = inp(np.ones((1, 1), np.float32))
    e = error_of(lambda: c.infer("controlled", [one], sequence_id="text", sequence_start=True))
    assert "integer sequence ids" in e.message() and "CORRID" in e.message()
    # An ended sequence is gone.
    c.infer("accumulate", [x], sequence_id=6, sequence_start=True, sequence_end=True)
    e = error_of(lambda: c.infer("accumulate", [x], sequence_id=6))
    assert "must specify the START flag" in e.message()


def test_an_idle_sequence_is_released_and_its_state_freed(tmp_path):
    repo = write(tmp_path, idle_us=2_000_000)  # long enough that the checks below come first
    w = Worker("--model-repository", str(repo))
    try:
        x = inp(np.ones((1, WIDTH), np.float32))
        w.client.infer("accumulate", [x], sequence_id=1, sequence_start=True)
        w.client.infer("accumulate", [x], sequence_id=2, sequence_start=True)
        assert metric(w, "infermesh_sequences_active", model="accumulate") == 2
        assert metric(w, "infermesh_sequences_state_bytes", model="accumulate") == 2 * WIDTH * 4
        wait_for("idle sequences released",
                 lambda: metric(w, "infermesh_sequences_active", model="accumulate") == 0)
        assert metric(w, "infermesh_sequences_state_bytes", model="accumulate") == 0
        assert metric(w, "infermesh_sequences_ended_total", model="accumulate", how="idle") == 2
        e = error_of(lambda: w.client.infer("accumulate", [x], sequence_id=1))
        assert "must specify the START flag" in e.message()
    finally:
        assert w.stop() == 0


def test_a_new_sequence_waits_for_a_slot_within_its_deadline(tmp_path):
    # accumulate_direct: 8 slots (max_batch_size 8, one instance); one may wait.
    repo = write(tmp_path)
    w = Worker("--model-repository", str(repo), "--max-queue-size", "1")
    c = w.client
    x = inp(np.ones((1, WIDTH), np.float32))
    try:
        for seq in range(1, 9):
            c.infer("accumulate_direct", [x], sequence_id=seq, sequence_start=True)
        e = error_of(lambda: c.infer("accumulate_direct", [x], sequence_id=9, sequence_start=True,
                                     client_timeout=0.3))
        assert e.status() == "StatusCode.DEADLINE_EXCEEDED", e
        # One waits (no deadline); a second waiter is refused; an end lets the first in.
        waiting = queue.Queue()
        c2 = grpcclient.InferenceServerClient(w.url)
        c2.async_infer("accumulate_direct", [x], lambda result, error: waiting.put(error), sequence_id=10,
                       sequence_start=True)
        wait_for("the new sequence waits",
                 lambda: metric(w, "infermesh_sequences_waiting", model="accumulate_direct") == 1)
        # Its next request queues behind its start (Triton's backlog), not refused.
        follow = queue.Queue()
        c2.async_infer("accumulate_direct", [x], lambda result, error: follow.put((result, error)),
                       sequence_id=10)
        e = error_of(lambda: c.infer("accumulate_direct", [x], sequence_id=11, sequence_start=True))
        assert e.status() == "StatusCode.RESOURCE_EXHAUSTED" and "sequence slots" in e.message()
        assert waiting.empty() and follow.empty()
        c.infer("accumulate_direct", [x], sequence_id=1, sequence_end=True)
        assert waiting.get(timeout=30) is None
        result, error = follow.get(timeout=30)
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("OUTPUT")[0], [2.0] * WIDTH)
        r = c.infer("accumulate_direct", [x], sequence_id=10)
        np.testing.assert_allclose(r.as_numpy("OUTPUT")[0], [3.0] * WIDTH)
        c2.close()
    finally:
        assert w.stop() == 0


def test_configs_that_cannot_be_honoured_are_refused_by_name(tmp_path):
    from stateful_models import accumulate_config, accumulate_graph, _save
    cases = {
        "iterative": ("oldest { max_candidate_sequences: 4 }\n  iterative_sequence: true",
                      "sequence_batching.iterative_sequence"),
        "nostate": ("direct { }\n  control_input [ { name: \"NOPE\" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]",
                    "control_input[0] 'NOPE'"),
    }
    for name, (strategy, field) in cases.items():
        _save(accumulate_graph(), tmp_path / name / "1" / "model.onnx")
        (tmp_path / name / "config.pbtxt").write_text(accumulate_config(name, strategy, 1_000_000))
    w = Worker("--model-repository", str(tmp_path), "--allow-empty-repository")
    try:
        index = {m.name: m.reason for m in w.client.get_model_repository_index().models}
        for name, (_, field) in cases.items():
            assert field in index[name], (name, index[name])
    finally:
        assert w.stop() == 0


@pytest.fixture
def fleet3(tmp_path):
    repo = write(tmp_path)
    (repo / "digits").symlink_to(ROOT / "models" / "digits")
    yield from three_workers_and_a_gateway("--model-repository", str(repo))


def holder(workers, seq):
    return sequences.holder(workers, seq, "accumulate")


def count(w, model):
    return w.client.get_inference_statistics(model).model_stats[0].inference_count


def test_through_the_gateway_each_sequence_stays_on_one_worker(fleet3):
    gateway, workers = fleet3
    rng = np.random.RandomState(2)
    chunks = {seq: [rng.rand(WIDTH).astype(np.float32) for _ in range(rng.randint(2, 7))]
              for seq in range(1, 31)}
    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(gateway.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    digits = grpcclient.InferInput("input", [1, 64], "FP32")
    digits.set_data_from_numpy(np.zeros((1, 64), np.float32))
    try:
        sent = 0
        for k in range(max(len(c) for c in chunks.values())):
            for seq, cs in chunks.items():
                if k < len(cs):
                    client.async_stream_infer("accumulate", [inp(cs[k][None, :])], request_id=f"{seq}/{k}",
                                              sequence_id=seq, sequence_start=k == 0,
                                              sequence_end=k == len(cs) - 1)
                    # A stateless message between the sequence's messages, on the same stream.
                    client.async_stream_infer("digits", [digits], request_id="-")
                    sent += 2
        got = {seq: {} for seq in chunks}
        for _ in range(sent):
            result, error = answers.get(timeout=60)
            assert error is None, error
            rid = result.get_response().id
            if rid != "-":
                seq, k = rid.split("/")
                got[int(seq)][int(k)] = result.as_numpy("OUTPUT")[0]
    finally:
        client.stop_stream()
        client.close()
    check_sums(chunks, {seq: [outs[k] for k in sorted(outs)] for seq, outs in got.items()})
    # Each worker ran exactly the requests of the sequences ranked to it.
    for w in workers:
        mine = sum(len(cs) for seq, cs in chunks.items() if holder(workers, seq) is w)
        assert count(w, "accumulate") == mine, (w.url, count(w, "accumulate"), mine)
    assert all(count(w, "accumulate") > 0 for w in workers), "sequences spread over all three"
    spread = [count(w, "digits") for w in workers]
    assert sum(spread) == sent // 2 and sum(1 for n in spread if n > 0) >= 2, spread


def test_a_killed_worker_loses_only_its_sequences(fleet3):
    gateway, workers = fleet3
    c = gateway.client
    one = np.ones((1, WIDTH), np.float32)
    seqs = list(range(200, 230))
    for seq in seqs:
        c.infer("accumulate", [inp(one)], sequence_id=seq, sequence_start=True)
    victim = holder(workers, seqs[0])
    victim.proc.kill()
    victim.proc.wait(timeout=30)
    lost = [s for s in seqs if holder(workers, s) is victim]
    for seq in seqs:
        if seq in lost:
            e = error_of(lambda: c.infer("accumulate", [inp(one)], sequence_id=seq))
            assert e.status() == "StatusCode.ABORTED" and "state is lost" in e.message(), e
        else:
            r = c.infer("accumulate", [inp(one)], sequence_id=seq, sequence_end=True)
            np.testing.assert_allclose(r.as_numpy("OUTPUT")[0], [2.0] * WIDTH)
    # New sequences, the lost ids included, start on the workers that are there.
    for seq in lost[:3] + [300, 301]:
        r = c.infer("accumulate", [inp(one)], sequence_id=seq, sequence_start=True, sequence_end=True)
        np.testing.assert_allclose(r.as_numpy("OUTPUT")[0], [1.0] * WIDTH)


def test_rest_requests_carry_sequences_too(worker):
    import tritonclient.http as httpclient
    c = httpclient.InferenceServerClient(worker.http_url)
    try:
        outs = []
        for n, (start, end) in enumerate([(True, False), (False, False), (False, True)]):
            x = httpclient.InferInput("INPUT", [1, WIDTH], "FP32")
            x.set_data_from_numpy(np.full((1, WIDTH), n + 1, np.float32))
            r = c.infer("accumulate", [x], sequence_id="rest-1", sequence_start=start, sequence_end=end)
            outs.append(float(r.as_numpy("OUTPUT")[0, 0]))
        assert outs == [1.0, 3.0, 6.0]
        x = httpclient.InferInput("INPUT", [1, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("accumulate", [x], sequence_id=31337)
        assert "must specify the START flag" in str(e.value)
    finally:
        c.close()


def test_placement_does_not_evict_a_model_with_open_sequences(tmp_path):
    from placement import matmul_model
    repo = write(tmp_path)
    for name in ("a", "b"):
        matmul_model(repo / name / "1" / "model.onnx", 1024)  # 4 MiB each

    def placed(capacity):
        return Worker("--model-repository", str(repo), "--model-control-mode", "placement",
                      "--model-memory-bytes", str(capacity), "--model-min-idle", "0s")

    w = placed(1 << 30)
    try:
        w.client.load_model("accumulate")
        w.client.load_model("a")
        first = metric(w, "infermesh_model_memory_bytes", model="accumulate")
        size = metric(w, "infermesh_model_memory_bytes", model="a")
    finally:
        assert w.stop() == 0
    w = placed(int(first + 1.5 * size))  # the stateful model and one more
    c = w.client
    x = inp(np.ones((1, WIDTH), np.float32))
    try:
        c.load_model("accumulate")
        c.infer("accumulate", [x], sequence_id=1, sequence_start=True)
        c.load_model("a")
        c.load_model("b")  # accumulate is the least recently used, but a sequence is open
        ready = {m.name: m.state for m in c.get_model_repository_index().models}
        assert (ready["accumulate"], ready["a"], ready["b"]) == ("READY", "UNAVAILABLE", "READY"), ready
        r = c.infer("accumulate", [x], sequence_id=1, sequence_end=True)
        np.testing.assert_allclose(r.as_numpy("OUTPUT")[0], [2.0] * WIDTH)
        c.load_model("a")  # no sequence open now: accumulate may go
        ready = {m.name: m.state for m in c.get_model_repository_index().models}
        assert ready["a"] == "READY" and "UNAVAILABLE" in (ready["accumulate"], ready["b"]), ready
    finally:
        assert w.stop() == 0
