"""Fuzzing the coordinator's gRPC stream: thousands of malformed client messages
(protobuf-level mutations of real ones among them), and raw bytes that are no message at
all, before and after a join, on hundreds of streams against one coordinator (TLS on
loopback). After every stream the coordinator must still answer a well-formed Hello with
a Challenge; at the end a proper run must complete with the very model an in-process
simulation computes. Then an admitted site forges its replies in live plain and secure
runs (the small version of ``benchmarks/reliability/fuzz.py``, RELIABILITY.md (a)).
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.reliability import fuzz as reliability
from deployment import (
    FAULT_APP,
    FAULT_PARAMS,
    Deployment,
    RawStream,
    genuine,
    hello,
    in_process_coordinator,
    join,
    reader_threads,
    simulated_data,
    site_key,
    upload,
)
from fault_apps import make_app
from fedlearn.security.keys import public_key_bytes
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy
from fedlearn.wire import fedlearn_pb2 as pb

EXAMPLES = 500  # streams (each about 5 ms, plus a probe stream)
MAX_MESSAGES = 30

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
task_ids = st.one_of(
    text,
    st.text("abc-r0123456789", min_size=120, max_size=140),  # around the 128-byte limit
    st.sampled_from(["r1-train-c0-00000000", "r1-evaluate-c0-0badf00d", ""]),
)
values = st.one_of(
    st.just(pb.Value()),  # no kind set
    st.builds(lambda v: pb.Value(bool_value=v), st.booleans()),
    st.builds(lambda v: pb.Value(int_value=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.Value(float_value=v), st.floats()),
    st.builds(lambda v: pb.Value(string_value=v), text),
)


def _hello(version: int, key: bytes, capabilities: list[str], name: str) -> pb.ClientMessage:
    return pb.ClientMessage(
        hello=pb.Hello(
            protocol_version=version, public_key=key, capabilities=capabilities, site_name=name
        )
    )


def _header(
    task_id: str,
    stage: int,
    round: int,
    num_examples: int,
    loss: float | None,
    metrics: dict[str, pb.Value],
    error: str | None,
    size: int,
) -> pb.ClientMessage:
    header = pb.ReplyHeader(
        task_id=task_id,
        stage=stage,  # type: ignore[arg-type]  # unknown enum values too
        round=round,
        num_examples=num_examples,
        metrics=metrics,
        payload_size=size,
    )
    if loss is not None:
        header.loss = loss
    if error is not None:
        header.error = error
    return pb.ClientMessage(reply_header=header)


def _chunk(
    task_id: str, index: int, data: bytes, last: bool, sha256: bytes = b""
) -> pb.ClientMessage:
    return pb.ClientMessage(
        chunk=pb.Chunk(task_id=task_id, index=index, data=data, last=last, sha256=sha256)
    )


def client_messages(enrolled_key: bytes) -> st.SearchStrategy[pb.ClientMessage | bytes]:
    """Any ClientMessage a broken or hostile site might send, or bytes that are none."""
    return st.one_of(
        st.builds(
            _hello,
            st.one_of(st.just(1), u32),
            st.one_of(st.just(enrolled_key), st.binary(max_size=40)),
            st.lists(text, max_size=3),
            text,
        ),
        st.builds(lambda s: pb.ClientMessage(proof=pb.Proof(signature=s)), st.binary(max_size=80)),
        st.builds(
            _header,
            task_ids,
            st.integers(0, 20),
            u32,
            u64,
            st.none() | st.floats(),
            st.dictionaries(text, values, max_size=3),
            st.none() | text,
            st.one_of(st.integers(0, 4096), u64),
        ),
        st.builds(
            _chunk,
            task_ids,
            st.one_of(st.integers(0, 3), u32),
            st.binary(max_size=300),
            st.booleans(),
            st.one_of(st.just(b""), st.binary(min_size=32, max_size=32), st.binary(max_size=40)),
        ),
        st.sampled_from([pb.ClientMessage(), pb.ClientMessage(heartbeat=pb.Heartbeat())]),
        st.binary(min_size=1, max_size=64),  # mostly not a ClientMessage at all
        st.builds(  # protobuf-level mutations of real messages (a Hello, a header, chunks)
            lambda real, rng: reliability.mutate_bytes(real, rng),
            st.sampled_from(REAL_MESSAGES),
            st.randoms(use_true_random=False),
        ),
    )


REAL_MESSAGES: list[bytes] = []  # filled from the deployment under test


REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ABORTED,  # a lapsed challenge: join again
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INTERNAL,  # gRPC's own answer to bytes that do not parse
}


def test_fuzzed_streams_never_break_the_coordinator(tmp_path: Path) -> None:
    d = Deployment(tmp_path, rounds=2, app=FAULT_APP, params=dict(FAULT_PARAMS))
    REAL_MESSAGES[:] = reliability.real_messages(d)
    fuzz_key, probe_key = site_key(d, 0), site_key(d, 1)
    threads_before = reader_threads()
    sent: list[int] = []
    codes: dict[str, int] = {}

    with (
        # every stream comes from 127.0.0.1, faster than a site's address may start joins
        in_process_coordinator(
            d,
            {
                "run.join_timeout_s": 600,
                "server.joins_per_peer_per_s": 10_000,
                "server.join_burst_per_peer": 10_000,
            },
        ) as c,
        c.channel() as channel,
    ):

        def assert_serving() -> None:
            probe = RawStream(channel, timeout=10)
            probe.send(hello(probe_key))
            challenge = probe.recv().challenge
            assert len(challenge.nonce) == 32 and challenge.server_id == "fedlearn-coordinator"
            probe.cancel()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            authenticate=st.booleans(),
            messages=st.lists(
                client_messages(public_key_bytes(fuzz_key)), min_size=1, max_size=MAX_MESSAGES
            ),
        )
        def fuzz(authenticate: bool, messages: list[Any]) -> None:
            raw = RawStream(channel, timeout=10)
            if authenticate:
                join(raw, fuzz_key)
            raw.send(*messages)
            code, details = raw.status()  # half-closes, then reads to the end
            sent.append(len(messages))
            codes[code.name] = codes.get(code.name, 0) + 1
            if authenticate:
                # garbage after the join never ends the stream with an error of ours;
                # bytes that do not parse make gRPC itself answer INTERNAL
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL), (code, details)
            else:
                assert code in REFUSALS, (code, details)
            assert_serving()

        fuzz()

        # Every fuzzed session is gone; a proper run now completes.
        deadline = time.monotonic() + 10
        while c.registry.available() and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        assert c.registry.available() == []  # type: ignore[union-attr]
        for i in range(d.num_sites):
            c.start_site(i)
        result = c.wait(60)
    # hundreds of streams and thousands of messages (about 6 per stream on average)
    assert len(sent) >= EXAMPLES // 2 and sum(sent) >= 1500, (len(sent), sum(sent), codes)
    assert [r.ok for r in result.rounds] == [True, True]
    assert all(r.train_ok == 3 and r.eval_ok == 3 for r in result.rounds)
    reference = run_simulation(
        functools.partial(make_app, simulated_data(d.num_sites, d.seed), **FAULT_PARAMS),
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    for name, value in result.arrays.items():
        assert np.isfinite(value).all()
        assert value.tobytes() == reference.arrays[name].tobytes(), name
    deadline = time.monotonic() + 10
    while reader_threads() > threads_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reader_threads() == threads_before


# ------------------------------------------------- tampered uploads during a live run

LIVE_EXAMPLES = 5  # live runs (about 0.3 s each to set up)
LIVE_ROUNDS = 20  # a tampered upload each (about 20 ms each): 100 tamperings

indices = st.integers(0, 64)
chunk_ops = st.one_of(
    st.tuples(st.just("flip"), indices, st.integers(0, 99), st.integers(0, 7)),
    st.tuples(st.just("truncate"), indices, st.integers(0, 49)),
    st.tuples(st.just("extend"), indices, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("drop"), indices),
    st.tuples(st.just("duplicate"), indices),
    st.tuples(st.just("swap"), indices, indices),
    st.tuples(st.just("index"), indices, st.integers(0, 9)),
    st.tuples(st.just("chunk_task"), indices, task_ids),
    st.tuples(st.just("last"), indices, st.booleans()),
    st.tuples(st.just("digest"), indices, st.binary(max_size=40)),
)
CHUNK_OPS = {
    "flip",
    "truncate",
    "extend",
    "drop",
    "duplicate",
    "swap",
    "index",
    "chunk_task",
    "last",
    "digest",
}
header_ops = st.one_of(
    st.tuples(st.just("size"), st.integers(-5, 5).filter(bool)),
    st.tuples(st.just("round"), st.integers(1, 3)),
    st.tuples(st.just("stage"), st.sampled_from([0, 2, 7])),
    st.tuples(st.just("header_task"), task_ids),
)
inserts = st.tuples(
    st.just("insert"),
    indices,
    st.sampled_from(
        [
            pb.ClientMessage(),
            pb.ClientMessage(heartbeat=pb.Heartbeat()),
            pb.ClientMessage(proof=pb.Proof(signature=bytes(64))),
            _chunk("r1-train-c0-00000000", 0, b"x", True),
            _header("r1-train-c2-00000000", 1, 1, 1, None, {}, None, 0),
        ]
    ),
)
tamperings = st.lists(st.one_of(chunk_ops, header_ops, inserts), max_size=4)


def _apply(ops: list[tuple[Any, ...]], header: pb.ReplyHeader, chunks: list[pb.Chunk]) -> list[Any]:
    """The messages of an upload after ``ops`` (payload and framing only: never a field a
    valid reply could carry differently, such as num_examples or metrics)."""
    messages: list[Any] = [pb.ClientMessage(reply_header=header)]
    messages += [pb.ClientMessage(chunk=c) for c in chunks]
    for op in ops:
        name, *args = op
        i, target = 0, None
        if name in CHUNK_OPS and len(messages) > 1:
            i = 1 + args[0] % (len(messages) - 1)  # any message but the header
            if messages[i].WhichOneof("kind") == "chunk":
                target = messages[i].chunk
        if name == "flip" and target is not None and target.data:
            data = bytearray(target.data)
            data[args[1] % len(data)] ^= 1 << args[2]
            target.data = bytes(data)
        elif name == "truncate" and target is not None:
            target.data = target.data[: args[1]]
        elif name == "extend" and target is not None:
            target.data += args[1]
        elif name == "drop" and i:
            del messages[i]
        elif name == "duplicate" and i:
            messages.insert(i, messages[i])
        elif name == "swap" and i:
            j = 1 + args[1] % (len(messages) - 1)
            messages[i], messages[j] = messages[j], messages[i]
        elif name == "index" and target is not None:
            target.index = args[1]
        elif name == "chunk_task" and target is not None:
            target.task_id = args[1]
        elif name == "last" and target is not None:
            target.last = args[1]
        elif name == "size":
            header.payload_size = max(0, header.payload_size + args[0])
        elif name == "digest" and target is not None:
            target.sha256 = args[1]
        elif name == "round":
            header.round += args[0]
        elif name == "stage":
            header.stage = args[0]
        elif name == "header_task":
            header.task_id = args[0]
        elif name == "insert":
            messages.insert(args[0] % (len(messages) + 1), args[1])
    return messages


@settings(
    max_examples=LIVE_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_tampered_uploads_in_a_live_run_are_rejected_or_exact(data: st.DataObject) -> None:
    """Every round, site 2 sends its genuine update with its payload or framing tampered
    with. Whatever the tampering, the coordinator either refuses that reply (a recorded
    failure of client 2) or takes exactly the genuine update: the final model is bit for
    bit that of a simulation in which client 2 failed in the rounds it was refused."""
    with tempfile.TemporaryDirectory() as root:
        d = Deployment(Path(root), rounds=LIVE_ROUNDS, app=FAULT_APP, params=dict(FAULT_PARAMS))
        with in_process_coordinator(d) as c, c.channel() as channel:
            c.start_site(0)
            c.start_site(1)
            raw = RawStream(channel, timeout=60)
            join(raw, site_key(d, 2))
            while (task := raw.recv_task()) is not None:
                header, arrays = task
                reply = genuine(d, header, arrays)
                if header.stage == pb.STAGE_EVALUATE:
                    raw.reply(header.task_id, reply)
                    continue
                reply_header, chunks = upload(header.task_id, reply, chunk_size=50)
                raw.send(*_apply(data.draw(tamperings), reply_header, chunks))
                # Settle the task if the tampered upload left it open (never-ending upload,
                # wrong task id): a second header ends a pending upload, and a failure reply
                # is taken only if nothing was.
                end = pb.ReplyHeader(
                    task_id=header.task_id,
                    stage=pb.STAGE_TRAIN,
                    round=header.round,
                    error="the upload was tampered with",
                )
                raw.send(pb.ClientMessage(reply_header=end))
            result = c.wait(60)
            store = c.store()
            rows = [r for r in store.clients() if r.client_id == 2]
            store.close()
    assert [r.ok for r in result.rounds] == [True] * LIVE_ROUNDS
    train = {r.round: r for r in rows if r.stage.value == "train"}
    assert sorted(train) == list(range(1, LIVE_ROUNDS + 1))
    assert all(r.ok or r.error for r in train.values())  # a refusal always says why
    refused = [r for r, row in train.items() if not row.ok]
    reference = run_simulation(
        functools.partial(
            make_app,
            simulated_data(d.num_sites, d.seed),
            **FAULT_PARAMS,
            fail_rounds=",".join(map(str, refused)),
            fail_client=2,
        ),
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    for name, value in result.arrays.items():
        assert value.tobytes() == reference.arrays[name].tobytes(), (name, refused)


# ---------------------------------------- an admitted site forging plain and secure replies


def test_an_admitted_site_forging_every_reply_changes_nothing(tmp_path: Path) -> None:
    """The small version of RELIABILITY.md (a): a few dozen garbage streams, then live
    plain and secure runs in which site 3 answers with oversized declarations, broken
    framing, wrong and out-of-order stages, protobuf-level mutations, forged SecAgg+
    messages (shares, keys, masked inputs, another client's name): no crash, no honest
    failure, every refusal says why, and each model is the clean run's bit for bit."""
    tally, _ = reliability.run(tmp_path, streams=40, plain_rounds=4, secure_rounds=4, seed=1)
    assert tally.problems == []
    assert tally.errors_logged == []
    assert tally.total >= 700, tally.messages
    refused = sum(n for k, n in tally.cancels.items() if k.endswith("upload refused"))
    ignored = sum(n for k, n in tally.cancels.items() if k.endswith("reply ignored"))
    assert refused >= 1 and ignored >= 1 and refused + ignored >= 6, tally.cancels
