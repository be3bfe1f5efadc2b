"""Sticky sequences through the gateway: every request of a sequence (Triton's
sequence_id) goes to one worker — chosen at its start by rendezvous ranking, the same in
every gateway — while requests without one are balanced as always, in the same stream; a
sequence whose worker dies mid-way gets ABORTED `sequence-lost`, others go on, and a new
start picks another worker."""
import json
import queue
import signal

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import MODELS, Gateway, Worker
from test_gateway_placement import score
from test_placement import metric

SAMPLE = np.array(json.loads((MODELS / "digits/samples.json").read_text())["inputs"][:1], dtype=np.float32)


def executions(w):
    return w.client.get_inference_statistics("digits").model_stats[0].inference_count


def digits_input():
    i = grpcclient.InferInput("input", [1, 64], "FP32")
    i.set_data_from_numpy(SAMPLE)
    return i


def holder(workers, seq, model="digits"):
    """The worker rendezvous ranking puts `model`'s sequence `seq` on, as every gateway does."""
    return max(workers, key=lambda w: (score(f"{model}\x00i:{seq}", w.url), w.url))


def three_workers_and_a_gateway(*worker_args):
    """A gateway in front of three workers (a generator for fixtures); a worker a test
    killed is not stopped again."""
    workers = [Worker("--intra-op-threads", "1", *worker_args) for _ in range(3)]
    gateway = Gateway(*workers)
    yield gateway, workers
    gateway.stop()
    for w in workers:
        if w.proc.poll() is None:
            assert w.stop() == 0


@pytest.fixture
def fleet3():
    yield from three_workers_and_a_gateway()


def test_each_sequence_stays_on_one_worker_and_sequences_spread(fleet3):
    gateway, workers = fleet3
    used = set()
    for seq in range(1, 31):
        before = [executions(w) for w in workers]
        for n in range(5):
            gateway.client.infer("digits", [digits_input()], sequence_id=seq, sequence_start=n == 0,
                                 sequence_end=n == 4)
        grew = [executions(w) - b for w, b in zip(workers, before)]
        assert sorted(grew) == [0, 0, 5], (seq, grew)
        on = workers[grew.index(5)]
        assert on is holder(workers, seq), "the rendezvous-ranked worker, as every gateway would pick"
        used.add(on.url)
    assert len(used) == 3, "sequences spread over every worker"
    # String ids too.
    before = [executions(w) for w in workers]
    for n in range(4):
        gateway.client.infer("digits", [digits_input()], sequence_id="session-a", sequence_start=n == 0)
    assert sorted(executions(w) - b for w, b in zip(workers, before)) == [0, 0, 4]


def test_stateless_messages_on_the_same_stream_are_still_balanced(fleet3):
    gateway, workers = fleet3
    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(gateway.url)
    client.start_stream(callback=lambda result, error: answers.put(error))
    try:
        before = [executions(w) for w in workers]
        for n in range(10):
            client.async_stream_infer("digits", [digits_input()], sequence_id=7, sequence_start=n == 0)
        for _ in range(10):
            assert answers.get(timeout=30) is None
        seq_grew = [executions(w) - b for w, b in zip(workers, before)]
        assert sorted(seq_grew) == [0, 0, 10], seq_grew
        before = [executions(w) for w in workers]
        for _ in range(90):
            client.async_stream_infer("digits", [digits_input()])
        for _ in range(90):
            assert answers.get(timeout=30) is None
        grew = [executions(w) - b for w, b in zip(workers, before)]
        assert sum(grew) == 90 and sum(1 for g in grew if g > 0) >= 2, grew
    finally:
        client.stop_stream()
        client.close()


def test_a_killed_workers_sequences_are_lost_and_only_those(fleet3):
    gateway, workers = fleet3
    seqs = list(range(100, 130))
    for seq in seqs:
        gateway.client.infer("digits", [digits_input()], sequence_id=seq, sequence_start=True)
    victim = holder(workers, seqs[0])
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=30)
    lost = [s for s in seqs if holder(workers, s) is victim]
    for seq in seqs:
        if seq in lost:
            with pytest.raises(InferenceServerException) as e:
                gateway.client.infer("digits", [digits_input()], sequence_id=seq)
            assert e.value.status() == "StatusCode.ABORTED", e.value
            assert "sequence-lost" in str(e.value) or "state is lost" in str(e.value), e.value
        else:
            gateway.client.infer("digits", [digits_input()], sequence_id=seq, sequence_end=True)
    # A new start picks a worker that is there.
    gateway.client.infer("digits", [digits_input()], sequence_id=lost[0], sequence_start=True)
    assert metric(gateway, "infermesh_gateway_sequences_lost_total") == len(lost)
    # Open: the survivors ended theirs; the lost ones are forgotten; the restarted one is open.
    assert metric(gateway, "infermesh_gateway_sequences_open") == 1
