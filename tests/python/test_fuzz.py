"""A mutation fuzzer (fixed seed, bounded time) against a real worker and a gateway in
front of two workers: valid ModelInferRequests for every model of the variable-dims test
repository, mutated at the protobuf level (fields) and at the byte level, sent unary and
in streams. No process may crash or log a panic, and no answer may be UNKNOWN or INTERNAL:
every mutation is a client error, answered as one, or a request that still makes sense."""
import random
import struct
import time

import grpc
import pytest
from tritonclient.grpc import service_pb2

from test_hostile import stub

SEED = 20261129
UNARY_PER_SERVER = 6000
STREAMS_PER_SERVER = 80
MESSAGES_PER_STREAM = 50
TIME_LIMIT_S = 150
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "BF16", "FP32", "FP64", "BYTES"]
DIMS = [-(2**63), -1, 0, 1, 2, 3, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]


def strings(*items):
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


def seeds():
    """One valid request per model of the test repository."""
    def req(model, inputs):
        r = service_pb2.ModelInferRequest(model_name=model, id="seed")
        for name, dt, shape, raw in inputs:
            t = r.inputs.add()
            t.name, t.datatype = name, dt
            t.shape.extend(shape)
            r.raw_input_contents.append(raw)
        return r
    return [
        req("text", [("INPUT0", "BYTES", [2], strings(b"hi", b"there"))]),
        req("vec_fp32", [("INPUT0", "FP32", [2, 3], struct.pack("<6f", *range(6)))]),
        req("vec_fp16", [("INPUT0", "FP16", [4], b"\0\x3c" * 4)]),
        req("matrix_fp32", [("INPUT0", "FP32", [1, 2], struct.pack("<2f", 1, 2)),
                            ("INPUT1", "INT32", [1], struct.pack("<i", 7)),
                            ("INPUT2", "UINT8", [2], b"\1\2")]),
        req("var_dims", [("text", "BYTES", [1], strings(b"abc")),
                         ("x", "FP32", [1, 2], struct.pack("<2f", 1, 2)),
                         ("h", "FP16", [3], b"\0\x3c" * 3)]),
    ]


def mutate_fields(r: service_pb2.ModelInferRequest, rng: random.Random):
    m = service_pb2.ModelInferRequest()
    m.CopyFrom(r)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        t = m.inputs[rng.randrange(len(m.inputs))] if m.inputs else None
        if op == 0 and t is not None:
            dims = list(t.shape)
            if dims and rng.random() < 0.7:
                dims[rng.randrange(len(dims))] = rng.choice(DIMS)
            else:
                dims.append(rng.choice(DIMS))
            del t.shape[:]
            t.shape.extend(dims)
        elif op == 1 and t is not None:
            t.datatype = rng.choice(DATATYPES + ["", "FP8", "x" * rng.randint(1, 5000)])
        elif op == 2 and t is not None:
            t.name = rng.choice(["", "INPUT0", "text", "\0", "é" * rng.randint(1, 3000)])
        elif op == 3 and m.raw_input_contents:
            i = rng.randrange(len(m.raw_input_contents))
            raw = bytearray(m.raw_input_contents[i])
            choice = rng.randrange(4)
            if choice == 0:
                raw = raw[: rng.randint(0, len(raw))]
            elif choice == 1:
                raw += rng.randbytes(rng.randint(1, 64))
            elif choice == 2 and raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            else:
                raw = struct.pack("<I", rng.choice([0, 1, 2**31, 2**32 - 1])) + raw
            m.raw_input_contents[i] = bytes(raw)
        elif op == 4:
            if rng.random() < 0.5 and m.raw_input_contents:
                del m.raw_input_contents[rng.randrange(len(m.raw_input_contents))]
            else:
                m.raw_input_contents.append(rng.randbytes(rng.randint(0, 32)))
        elif op == 5 and t is not None:
            c = t.contents
            kind = rng.choice(["bool_contents", "int_contents", "int64_contents", "uint_contents",
                               "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"])
            n = rng.choice([0, 1, 3, 1000])
            if kind == "bytes_contents":
                getattr(c, kind).extend(rng.randbytes(rng.randint(0, 8)) for _ in range(n))
            elif kind == "bool_contents":
                getattr(c, kind).extend(rng.random() < 0.5 for _ in range(n))
            elif kind in ("fp32_contents", "fp64_contents"):
                getattr(c, kind).extend(rng.choice([0.0, float("nan"), 1e308, -1.5]) for _ in range(n))
            elif kind in ("uint_contents",):
                getattr(c, kind).extend(rng.randrange(2**32) for _ in range(n))
            elif kind in ("uint64_contents",):
                getattr(c, kind).extend(rng.randrange(2**64) for _ in range(n))
            elif kind in ("int_contents",):
                getattr(c, kind).extend(rng.randrange(-(2**31), 2**31) for _ in range(n))
            else:
                getattr(c, kind).extend(rng.randrange(-(2**63), 2**63) for _ in range(n))
            if rng.random() < 0.5:
                del m.raw_input_contents[:]
        elif op == 6:
            key = rng.choice(["timeout", "priority", "infermesh_unordered", "sequence_id", "x" * 100])
            p = m.parameters[key]
            kind = rng.randrange(4)
            if kind == 0:
                p.int64_param = rng.choice([-(2**63), -1, 0, 1, 2**63 - 1])
            elif kind == 1:
                p.uint64_param = rng.choice([0, 1, 2**64 - 1])
            elif kind == 2:
                p.bool_param = rng.random() < 0.5
            else:
                p.string_param = rng.choice(["", "1", "é" * 100])
        elif op == 7:
            m.model_version = rng.choice(["", "1", "2", "-1", "99999999999999999999", "x", "1" * 5000])
        elif op == 8:
            o = m.outputs.add()
            o.name = rng.choice(["OUTPUT0", "x_out", "nope", "", "o" * 3000])
        elif op == 9 and t is not None:
            m.inputs.add().CopyFrom(t)
        elif op == 10 and m.inputs:
            del m.inputs[rng.randrange(len(m.inputs))]
        elif op == 11:
            m.model_name = rng.choice(["text", "var_dims", "", "../x", "m" * rng.randint(1, 5000)])
    return m.SerializeToString()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            at = rng.randint(0, len(b))
            b[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and b:
            at = rng.randrange(len(b))
            del b[at:at + rng.randint(1, 16)]
        elif op == 3 and b:
            b = b[: rng.randrange(len(b))]
        elif op == 4 and b:
            at = rng.randrange(len(b))
            b[at:at] = b[at:at + rng.randint(1, 32)]
    return bytes(b)


def mutants(rng: random.Random, decodable_only=False):
    base = seeds()
    while True:
        seed = rng.choice(base)
        if decodable_only or rng.random() < 0.5:
            yield mutate_fields(seed, rng)
        else:
            yield mutate_bytes(seed.SerializeToString(), rng)


def panics(server):
    return [line for line in server.log if "panic" in line]


def test_mutated_requests_never_crash_or_look_like_server_errors(fleet):
    gateway, workers = fleet
    rng = random.Random(SEED)
    gen = mutants(rng)
    # Streams mostly carry messages that decode (an undecodable one ends its stream).
    decodable = mutants(rng, decodable_only=True)
    codes: dict = {}
    forbidden = []
    start = time.monotonic()
    sent = 0
    for server in [workers[0], gateway]:
        channel = grpc.insecure_channel(server.url)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        pending = []
        for _ in range(UNARY_PER_SERVER):
            data = next(gen)
            pending.append((data, infer.future(data, timeout=30)))
            if len(pending) >= 32:
                for data, f in pending:
                    try:
                        f.result()
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                        if code in FORBIDDEN:
                            forbidden.append((server.url, code, e.details()[:300], data[:200]))
                    codes[code] = codes.get(code, 0) + 1
                sent += len(pending)
                pending = []
            if time.monotonic() - start > TIME_LIMIT_S:
                break
        for i in range(STREAMS_PER_SERVER):
            source = gen if i % 10 == 0 else decodable
            msgs = [next(source) for _ in range(MESSAGES_PER_STREAM)]
            sent += len(msgs)
            try:
                for answer in stream(iter(msgs), timeout=60):
                    resp = service_pb2.ModelStreamInferResponse.FromString(answer)
                    code = resp.infer_response.parameters["infermesh_status_code"].int64_param \
                        if resp.error_message else 0
                    codes[f"stream {code}"] = codes.get(f"stream {code}", 0) + 1
                    if code in (2, 13):
                        forbidden.append((server.url, code, resp.error_message[:300], None))
            except grpc.RpcError as e:
                # An undecodable message ends its stream, answered INVALID_ARGUMENT.
                codes[f"stream end {e.code()}"] = codes.get(f"stream end {e.code()}", 0) + 1
                if e.code() in FORBIDDEN:
                    forbidden.append((server.url, e.code(), e.details()[:300], None))
        channel.close()
    elapsed = time.monotonic() - start
    print(f"\nfuzz: {sent} mutated messages in {elapsed:.0f}s: {codes}")
    assert sent >= 10_000, f"only {sent} sent in the time limit"
    assert forbidden == [], forbidden[:5]
    for s in [gateway, *workers]:
        assert s.proc.poll() is None, f"{s.url} exited"
        assert s.client.is_server_ready()
        assert panics(s) == [], panics(s)[:3]
    # Anything valid still works after all that.
    assert codes.get(grpc.StatusCode.OK, 0) > 0 and codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
