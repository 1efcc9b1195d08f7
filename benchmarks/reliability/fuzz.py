"""RELIABILITY.md (a): malformed and adversarial messages against a live coordinator.

One coordinator (``run_coordinator`` in this process: TLS on loopback, real Ed25519
admission, SQLite run store) takes, in three phases:

1. **peers**: streams from unauthenticated peers (unknown keys, random bytes for keys,
   an enrolled key without a valid proof) and from an admitted site after its join, each
   carrying up to 30 messages: protobuf-level mutations of real messages (a Hello, a
   Proof, a reply header, its chunks: bits flipped, bytes cut, inserted or repeated),
   random ClientMessages, real messages out of place, and bytes that are no message.
   Every stream must end with a refusal status that says why (before the join) or OK /
   gRPC's INTERNAL for bytes that do not parse (after it), and the coordinator must still
   answer a Hello after each batch. Then three honest sites run the federation.
2. **plain**: a live run where an admitted site (site 3 of 4) answers every training task
   with adversarial uploads: declared sizes of 3 GiB and 2^64-1, sizes off by a few bytes,
   chunks truncated, oversized, duplicated, dropped, reordered, reindexed, re-tasked,
   marked last early, digests wrong or early, wrong and out-of-order stages, wrong rounds,
   replies to stale or made-up tasks, protobuf-level mutations of its messages (now and
   then bytes that do not parse, which end its stream: it joins again), and in about
   one round in five only the genuine reply.
3. **secure**: the same with secure aggregation on, the site's SecAgg+ messages forged at
   every stage: messages of another stage (out of order), another round, another client
   (impersonation), truncated or with a broken frame, forged key advertisements, forged
   encrypted shares (wrong receivers, duplicated, missing, wrong sizes), masked inputs of
   the wrong length or dtype, forged unmasking shares (someone else's index, owners not
   asked for, owners missing), 3 GiB declarations, and sometimes the genuine message.

Passes when: the coordinator never crashes (no exception escapes it or its threads, no
error logged), every honest site's every task succeeds, every bad reply is refused with
a reason (told to the site in a Cancel and recorded in run.db) or ignored with a Cancel
that says so, and each run's final global model is bit for bit the model of a clean run
in which the fuzzing site simply failed where its replies were refused (an in-process
simulation, secure for phase 3).

    .venv/bin/python benchmarks/reliability/fuzz.py                 # ~12,000 messages
    .venv/bin/python benchmarks/reliability/fuzz.py --streams 300 --plain-rounds 5 --secure-rounds 5

``tests/test_deploy_fuzz.py`` runs a small version of each phase in CI.
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
for extra in (ROOT, ROOT / "tests"):
    sys.path.insert(0, str(extra))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from deployment import (  # noqa: E402
    FAULT_APP,
    FAULT_PARAMS,
    Deployment,
    RawStream,
    Running,
    fault_runtime,
    genuine,
    hello,
    in_process_coordinator,
    join,
    simulated_data,
    site_key,
    upload,
)
from fault_apps import make_app  # noqa: E402
from fedlearn.engine.messages import Reply, Stage  # noqa: E402
from fedlearn.engine.records import Arrays  # noqa: E402
from fedlearn.engine.runtime import ClientRuntime  # noqa: E402
from fedlearn.secagg import shamir  # noqa: E402
from fedlearn.secagg.config import CIPHERTEXT_SIZE  # noqa: E402
from fedlearn.secagg.messages import (  # noqa: E402
    AdvertiseKeys,
    MaskedInput,
    ShareKeys,
    UnmaskShares,
    decode_message,
    encode_message,
)
from fedlearn.secagg.stages import SecureAggregation  # noqa: E402
from fedlearn.security.keys import generate_site_key, public_key_bytes  # noqa: E402
from fedlearn.simulation import run_simulation  # noqa: E402
from fedlearn.strategy import build_strategy  # noqa: E402
from fedlearn.wire import PROTOCOL_VERSION  # noqa: E402
from fedlearn.wire import fedlearn_pb2 as pb  # noqa: E402
from fedlearn.wire.convert import stage_to_proto  # noqa: E402

GiB = 1 << 30
UINT64_MAX = 2**64 - 1
SECAGG = {"secagg.enabled": True, "secagg.clip": 2.0, "secagg.max_weight": 1000}
FUZZ_SITE = 3  # of 4: sites 0-2 are honest
REFUSALS = {  # how a stream that never joined may end (each with details saying why)
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ABORTED,  # a lapsed challenge: join again
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # too many Hellos from one peer or for one key
    grpc.StatusCode.INTERNAL,  # gRPC's own answer to bytes that do not parse
}
ANSWERS = ("upload refused: ", "reply ignored: ", "stage deadline passed", "stage abandoned")
Message = pb.ClientMessage | bytes


@dataclass
class Tally:
    """What was sent, and how the coordinator answered."""

    messages: Counter[str] = field(default_factory=Counter)
    streams: Counter[str] = field(default_factory=Counter)
    cancels: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    errors_logged: list[str] = field(default_factory=list)

    def sent(self, phase: str, count: int) -> None:
        self.messages[phase] += count

    def fail(self, problem: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(problem)

    def answered(self, raw: RawStream, seen: int, phase: str) -> int:
        """Count the Cancels ``raw`` collected since ``seen``; each must say why."""
        for cancel in raw.cancels[seen:]:
            kind = next((a for a in ANSWERS if cancel.reason.startswith(a)), None)
            if kind is None or len(cancel.reason) <= len(kind):
                self.fail(f"a Cancel without a clear reason: {cancel.reason!r}")
            self.cancels[f"{phase}: {(kind or cancel.reason).strip(': ')}"] += 1
        return len(raw.cancels)

    @property
    def total(self) -> int:
        return sum(self.messages.values())


class ErrorLog(logging.Handler):
    """Collects every error the coordinator logs (a reader thread that failed, ...)."""

    def __init__(self, tally: Tally) -> None:
        super().__init__(logging.ERROR)
        self.tally = tally

    def emit(self, record: logging.LogRecord) -> None:
        self.tally.errors_logged.append(f"{record.name}: {record.getMessage()}")


# ------------------------------------------------------------ protobuf-level mutations


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """``data`` (a serialized message) with one to three byte-level mutations."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a bit
            j = rng.randrange(len(out))
            out[j] ^= 1 << rng.randrange(8)
        elif op == 1:  # cut the tail
            del out[i:]
        elif op == 2:  # cut a slice
            del out[i : i + rng.randint(1, 8)]
        elif op == 3:  # insert random bytes
            out[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # repeat a slice (fields twice, lengths off)
            out[i:i] = out[max(0, i - rng.randint(1, 16)) : i]
        elif op == 5 and out:  # another tag or length byte
            out[rng.randrange(len(out))] = rng.choice([0x08, 0x0A, 0x12, 0x1A, 0x22, 0x7F, 0xFF])
        else:  # append a copy of the whole message (protobuf merges it)
            out += data
    return bytes(out)


def random_message(rng: random.Random, real: list[bytes], enrolled: bytes) -> Message:
    """Any message a broken or hostile peer might send, or bytes that are none."""
    pick = rng.random()
    if pick < 0.35:
        return mutate_bytes(rng.choice(real), rng)
    if pick < 0.55:
        return rng.choice(real)  # a real message, out of place
    if pick < 0.65:
        return rng.randbytes(rng.randint(1, 64))
    kind = rng.randrange(6)
    text = "".join(rng.choice("abc-r0123456789\u00e9\u4e2d") for _ in range(rng.randint(0, 140)))
    if kind == 0:
        key = enrolled if rng.random() < 0.5 else rng.randbytes(rng.choice([0, 31, 32, 33]))
        version = rng.choice([PROTOCOL_VERSION, 0, 1, 3, 2**32 - 1])
        return pb.ClientMessage(hello=pb.Hello(protocol_version=version, public_key=key))
    if kind == 1:
        return pb.ClientMessage(proof=pb.Proof(signature=rng.randbytes(rng.choice([0, 63, 64]))))
    if kind == 2:
        header = pb.ReplyHeader(
            task_id=text,
            stage=rng.randrange(9),  # type: ignore[arg-type]  # unknown values too
            round=rng.randrange(2**32),
            num_examples=rng.randrange(2**64),
            payload_size=rng.choice([0, 10, 4096, 3 * GiB, UINT64_MAX]),
        )
        if rng.random() < 0.5:
            header.error = text
        return pb.ClientMessage(reply_header=header)
    if kind == 3:
        return pb.ClientMessage(
            chunk=pb.Chunk(
                task_id=text,
                index=rng.choice([0, 1, 2**32 - 1]),
                data=rng.randbytes(rng.randint(0, 300)),
                last=rng.random() < 0.5,
                sha256=rng.randbytes(rng.choice([0, 32, 40])),
            )
        )
    if kind == 4:
        return pb.ClientMessage(heartbeat=pb.Heartbeat())
    return pb.ClientMessage()


def real_messages(d: Deployment) -> list[bytes]:
    """Serialized real messages to mutate: a Hello, a Proof, a reply header and chunks."""
    arrays = {k: np.asarray(v) for k, v in d.initial.items()}
    reply = Reply(Stage.TRAIN, 1, 0, 100, arrays)
    header, chunks = upload("r1-train-c0-0a1b2c3d", reply, chunk_size=100)
    messages = [hello(site_key(d, 0)), pb.ClientMessage(proof=pb.Proof(signature=bytes(64)))]
    messages += [pb.ClientMessage(reply_header=header)]
    messages += [pb.ClientMessage(chunk=c) for c in chunks]
    return [m.SerializeToString() for m in messages]


# ---------------------------------------------------------------------- phase 1: peers


def peers_phase(root: Path, streams: int, rng: random.Random, tally: Tally) -> None:
    """Streams of garbage against a coordinator waiting for its sites, then a clean run."""
    d = Deployment(root, num_sites=3, rounds=2, app=FAULT_APP, params=dict(FAULT_PARAMS))
    enrolled = public_key_bytes(site_key(d, 0))
    real = real_messages(d)
    strangers = [generate_site_key() for _ in range(4)]
    with in_process_coordinator(d, {"run.join_timeout_s": 3600}) as c, c.channel() as channel:
        for i in range(streams):
            admitted = rng.random() < 0.4
            raw = RawStream(channel, timeout=20)
            if admitted:
                join(raw, site_key(d, 0))
                tally.sent("peers (admitted)", 2)
            elif rng.random() < 0.3:
                raw.send(hello(rng.choice(strangers)))  # a key the allowlist does not know
                tally.sent("peers (unauthenticated)", 1)
            messages = [random_message(rng, real, enrolled) for _ in range(rng.randint(1, 30))]
            raw.send(*messages)
            code, details = raw.status()
            label = "peers (admitted)" if admitted else "peers (unauthenticated)"
            tally.sent(label, len(messages))
            tally.streams[f"{label}: {code.name}"] += 1
            if admitted and code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL):
                tally.fail(f"admitted stream ended with {code.name}: {details}")
            if not admitted and (code not in REFUSALS or not details):
                tally.fail(f"unauthenticated stream ended with {code.name}: {details!r}")
            if i % 50 == 49:
                assert_serving(c, channel, d, tally)
        deadline = time.monotonic() + 10
        while c.registry.available() and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        for site in range(d.num_sites):
            c.start_site(site)
        result = c.wait(120)
    if not all(r.ok and r.train_ok == 3 for r in result.rounds):
        tally.fail(f"peers: the clean run after the fuzzing failed: {result.rounds}")
    reference = _reference(d, refused=[])
    compare(result.arrays, reference, "peers", tally)


def assert_serving(c: Running, channel: grpc.Channel, d: Deployment, tally: Tally) -> None:
    probe = RawStream(channel, timeout=10)
    probe.send(hello(site_key(d, 1)))
    if len(probe.recv().challenge.nonce) != 32:
        tally.fail("the coordinator stopped answering a Hello with a Challenge")
    probe.cancel()


# ------------------------------------------------------------- phase 2: plain uploads


def _tamper_upload(
    header: pb.ReplyHeader, chunks: list[pb.Chunk], rng: random.Random, stale: list[str]
) -> list[Message]:
    """One adversarial upload of a genuine reply: framing and size, never content a valid
    reply could carry (the genuine digest stays on the last chunk to catch data changes)."""
    digest = chunks[-1].sha256 if chunks else b""
    messages: list[Message] = []
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(16)
        if op == 0:
            header.payload_size = rng.choice([3 * GiB, UINT64_MAX, 2 * header.payload_size])
        elif op == 1:
            header.payload_size = max(0, header.payload_size + rng.choice([-5, -1, 1, 7]))
        elif op == 2:  # another stage: out of order, unknown, unspecified, secure
            header.stage = rng.choice([0, 2, 3, 4, 5, 6, 7, 15])  # type: ignore[assignment]
        elif op == 3:
            header.round += rng.choice([-1, 1, 1000])
        elif op == 4:
            header.task_id = rng.choice(stale) if stale else "r0-train-c3-deadbeef"
        elif chunks:
            i = rng.randrange(len(chunks))
            chunk = chunks[i]
            if op == 5:
                chunk.data = chunk.data[: rng.randrange(len(chunk.data) + 1)]
            elif op == 6:
                chunk.data += rng.randbytes(rng.randint(1, 9))
            elif op == 7:
                del chunks[i]
            elif op == 8:
                chunks.insert(rng.randrange(len(chunks) + 1), chunk)
            elif op == 9:
                j = rng.randrange(len(chunks))
                chunks[i], chunks[j] = chunks[j], chunks[i]
            elif op == 10:
                chunk.index = rng.choice([0, chunk.index + 1, chunk.index + 5, 2**32 - 1])
            elif op == 11:
                chunk.task_id = rng.choice([*stale, "other", ""])
            elif op == 12:
                chunk.last = not chunk.last
            elif op == 13:
                chunk.sha256 = rng.choice([bytes(32), rng.randbytes(7), digest])
            elif op == 14 and chunk.data:  # a bit flipped: the genuine digest catches it
                data = bytearray(chunk.data)
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                chunk.data = bytes(data)
                chunks[-1].sha256 = digest
            else:
                chunks.insert(i, pb.Chunk(task_id=header.task_id, index=i, data=b"x" * 5))
    messages.append(pb.ClientMessage(reply_header=header))
    messages += [pb.ClientMessage(chunk=c) for c in chunks]
    if rng.random() < 0.3:  # a protobuf-level mutation of one of them that still parses
        k = rng.randrange(len(messages))
        original = messages[k]
        assert isinstance(original, pb.ClientMessage)
        for _ in range(10):
            candidate = mutate_bytes(original.SerializeToString(), rng)
            if framing_only(original, candidate):
                messages[k] = candidate
                break
    return messages


def framing_only(original: pb.ClientMessage, candidate: bytes) -> bool:
    """Whether ``candidate`` parses and differs from ``original`` only where a change must
    be refused (sizes, stage, round, task ids, indices, last flags, digests added, chunk
    data under the genuine digest), never in what a valid reply could carry otherwise
    (num_examples, loss, metrics) or by dropping the digest that guards the data."""
    try:
        mutated = pb.ClientMessage.FromString(candidate)
    except Exception:
        return False
    if mutated.WhichOneof("kind") != original.WhichOneof("kind"):
        return mutated.WhichOneof("kind") in (None, "heartbeat", "hello", "proof")
    if original.WhichOneof("kind") == "reply_header":
        a, b = original.reply_header, mutated.reply_header
        return (a.num_examples, a.HasField("loss"), a.loss, dict(a.metrics)) == (
            b.num_examples,
            b.HasField("loss"),
            b.loss,
            dict(b.metrics),
        )
    if original.WhichOneof("kind") == "chunk":
        return not original.chunk.sha256 or mutated.chunk.sha256 == original.chunk.sha256
    return True


class FuzzingSite:
    """Site 3 on a raw stream: every reply it sends is adversarial, now and then genuine."""

    def __init__(
        self, d: Deployment, channel: grpc.Channel, rng: random.Random, tally: Tally, phase: str
    ) -> None:
        self.d, self.channel, self.rng, self.tally, self.phase = d, channel, rng, tally, phase
        self.runtime: ClientRuntime = fault_runtime(d)
        self.stale: list[str] = []
        self.raw = self._join()
        self.seen = 0
        self.rejoins = 0

    def _join(self) -> RawStream:
        raw = RawStream(self.channel, timeout=600)
        join(raw, site_key(self.d, FUZZ_SITE))
        self.tally.sent(self.phase, 2)
        return raw

    def send(self, messages: list[Message]) -> None:
        self.raw.send(*messages)
        self.tally.sent(self.phase, len(messages))

    def serve(self, answer: Callable[[pb.TaskHeader, Arrays, bytes], None]) -> None:
        """Answer tasks until the run ends; rejoin when a stream was ended by garbage."""
        while True:
            try:
                task = self.raw.recv_task_message()
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.INTERNAL:  # type: ignore[attr-defined]
                    self.tally.fail(f"{self.phase}: the fuzzing site's stream ended with {exc}")
                    return
                self.tally.streams[f"{self.phase}: INTERNAL (bytes that do not parse)"] += 1
                self.seen = self.tally.answered(self.raw, self.seen, self.phase)
                self.raw, self.seen = self._join(), 0
                self.rejoins += 1
                continue
            if task is None:
                break
            answer(*task)
            self.seen = self.tally.answered(self.raw, self.seen, self.phase)
        self.tally.answered(self.raw, self.seen, self.phase)

    def reply(self, header: pb.TaskHeader, reply: Reply) -> None:
        reply_header, chunks = upload(header.task_id, reply, chunk_size=self.rng.choice([64, 500]))
        self.send([pb.ClientMessage(reply_header=reply_header), *map(_chunk, chunks)])

    def garbage(self, unparsable: float) -> None:
        """Now and then bytes that do not parse: gRPC ends this stream (INTERNAL)."""
        if self.rng.random() < unparsable:
            self.send([b"\xff\x01\x02"])

    def plain(self, header: pb.TaskHeader, arrays: Arrays, message: bytes) -> None:
        reply = genuine(self.d, header, arrays, FUZZ_SITE, message, self.runtime)
        honest = self.rng.random() < 0.2  # now and then a round it answers genuinely
        if header.stage == pb.STAGE_TRAIN and not honest:
            for _ in range(self.rng.randint(1, 4)):
                reply_header, chunks = upload(header.task_id, reply, chunk_size=50)
                self.send(_tamper_upload(reply_header, chunks, self.rng, self.stale))
            self.garbage(0.05)
        if honest or self.rng.random() < 0.4 or header.stage != pb.STAGE_TRAIN:
            self.reply(header, reply)  # taken only if nothing settled the task before
        else:  # settle the task with a failure if the tampering left it open
            self.send([_failure(header)])
        self.stale.append(header.task_id)


def _chunk(chunk: pb.Chunk) -> pb.ClientMessage:
    return pb.ClientMessage(chunk=chunk)


def _failure(header: pb.TaskHeader) -> pb.ClientMessage:
    return pb.ClientMessage(
        reply_header=pb.ReplyHeader(
            task_id=header.task_id, stage=header.stage, round=header.round, error="gave up"
        )
    )


def plain_phase(root: Path, rounds: int, rng: random.Random, tally: Tally) -> None:
    """A live run in which site 3 answers every training task adversarially."""
    d = Deployment(
        root,
        num_sites=4,
        rounds=rounds,
        app=FAULT_APP,
        params=dict(FAULT_PARAMS),
        stage_timeout_s=20.0,
    )
    with in_process_coordinator(d) as c, c.channel() as channel:
        for site in range(3):
            c.start_site(site)
        site = FuzzingSite(d, channel, rng, tally, "plain (admitted site)")
        site.serve(site.plain)
        result = c.wait(120)
        records = c.store()
        rows = list(records.clients())
        records.close()
    check_run(result, rows, "plain", rounds, tally)
    refused = sorted(r.round for r in rows if r.client_id == FUZZ_SITE and not r.ok)
    refused_train = sorted({r for r in refused if _train_failed(rows, r)})
    compare(result.arrays, _reference(d, refused_train), "plain", tally)
    tally.streams["plain: rounds in which the fuzzing site's update was refused"] += len(
        refused_train
    )
    tally.streams["plain: rounds in which it was taken (genuine)"] += rounds - len(refused_train)


def _train_failed(rows: list[Any], rnd: int) -> bool:
    stages = (Stage.TRAIN, Stage.SECAGG_SETUP, Stage.SECAGG_KEYS, Stage.SECAGG_SHARES)
    return any(
        r.round == rnd and r.client_id == FUZZ_SITE and r.stage in stages and not r.ok for r in rows
    )


# ------------------------------------------------------------ phase 3: secure rounds


def _forge(msg: Any, stage: Stage, rng: random.Random, honest: list[int]) -> bytes:
    """A message the protocol must refuse at ``stage``, made from the genuine ``msg``."""
    r, me = msg.round, msg.client_id
    others: list[Any] = [
        AdvertiseKeys(r, me, bytes(range(32)), bytes(range(1, 33))),
        ShareKeys(r, me, ()),
        MaskedInput(r, me, np.zeros(3, np.uint32)),
        UnmaskShares(r, me, (), ()),
    ]
    op = rng.randrange(6)
    if op == 0:  # a message of another stage: out of order, or replayed
        wrong = [m for m in others if type(m) is not type(msg)]
        return encode_message(rng.choice(wrong))
    if op == 1:  # another client's name on it
        return encode_message(replace(msg, client_id=rng.choice(honest)))
    if op == 2:  # another round's
        return encode_message(replace(msg, round=r + rng.choice([1, 2**20])))
    data = encode_message(msg)
    if op == 3:  # cut short, or a broken frame
        if rng.random() < 0.5:
            return data[: rng.randrange(len(data))]
        broken = bytearray(data)
        broken[rng.randrange(9)] ^= 0xFF  # magic, type code or header length
        return bytes(broken)
    # op 4, 5: forged contents of this stage's message
    if isinstance(msg, AdvertiseKeys):
        return encode_message(
            rng.choice([replace(msg, s_pk=msg.c_pk), replace(msg, c_pk=msg.c_pk[:31])])
        )
    if isinstance(msg, ShareKeys):
        pairs = list(msg.ciphertexts)
        i = rng.randrange(len(pairs))
        choice = rng.randrange(4)
        if choice == 0:
            pairs[i] = (10**6 + i, pairs[i][1])  # a receiver that is no neighbour
        elif choice == 1:
            pairs.append(pairs[i])  # the same receiver twice
        elif choice == 2:
            del pairs[i]  # a neighbour left out
        else:
            pairs[i] = (pairs[i][0], rng.randbytes(CIPHERTEXT_SIZE - 1))  # wrong size
        return encode_message(replace(msg, ciphertexts=tuple(pairs)))
    if isinstance(msg, MaskedInput):
        masked = msg.masked
        wrong = rng.choice(
            [masked[:-1], np.concatenate([masked, masked[:1]]), masked.astype(np.uint64)]
        )
        return encode_message(replace(msg, masked=wrong))
    assert isinstance(msg, UnmaskShares)
    shares = list(msg.b_shares)
    i = rng.randrange(len(shares))
    choice = rng.randrange(3)
    if choice == 0:  # a share with someone else's index: not the sender's own
        share = shamir.Share.from_bytes(shares[i][1])
        forged = shamir.Share(share.index % 50 + 51, share.threshold, share.value)
        shares[i] = (shares[i][0], forged.to_bytes())
    elif choice == 1:
        shares[i] = (10**6, shares[i][1])  # an owner not asked for
    else:
        del shares[i]  # an owner asked for, missing
    return encode_message(replace(msg, b_shares=tuple(shares)))


def secure_phase(root: Path, rounds: int, rng: random.Random, tally: Tally) -> None:
    """A live secure run in which site 3 forges its messages at a random stage per round."""
    d = Deployment(
        root,
        num_sites=4,
        rounds=rounds,
        app=FAULT_APP,
        params=dict(FAULT_PARAMS),
        stage_timeout_s=20.0,
    )
    secure_stages = [Stage.SECAGG_SETUP, Stage.SECAGG_KEYS, Stage.SECAGG_SHARES]
    secure_stages.append(Stage.SECAGG_UNMASK)
    with in_process_coordinator(d, SECAGG) as c, c.channel() as channel:
        for site in range(3):
            c.start_site(site)
        site = FuzzingSite(d, channel, rng, tally, "secure (admitted site)")
        target: dict[int, Stage | None] = {}

        def answer(header: pb.TaskHeader, arrays: Arrays, message: bytes) -> None:
            reply = genuine(d, header, arrays, FUZZ_SITE, message, site.runtime)
            if header.round not in target:  # one stage per round is forged (or none)
                target[header.round] = rng.choice([*secure_stages, None])
            stage = target[header.round]
            if stage is None or header.stage != stage_to_proto(stage) or not reply.ok:
                site.reply(header, reply)
                return
            msg = decode_message(reply.payload)
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.15:  # declared 3 GiB, 10 bytes sent
                    forged_header = pb.ReplyHeader(
                        task_id=header.task_id,
                        stage=header.stage,
                        round=header.round,
                        payload_size=3 * GiB,
                        message_size=3 * GiB,
                    )
                    chunk = pb.Chunk(task_id=header.task_id, index=0, data=b"0123456789")
                    site.send([pb.ClientMessage(reply_header=forged_header), _chunk(chunk)])
                    continue
                if rng.random() < 0.2:  # the right message under another stage's header
                    reply_header, chunks = upload(header.task_id, reply, chunk_size=200)
                    others = [s for s in [*secure_stages, Stage.TRAIN] if s is not stage]
                    reply_header.stage = stage_to_proto(rng.choice(others))
                else:
                    forged = replace(reply, payload=_forge(msg, stage, rng, [0, 1, 2]))
                    reply_header, chunks = upload(header.task_id, forged, chunk_size=200)
                site.send([pb.ClientMessage(reply_header=reply_header), *map(_chunk, chunks)])
            site.garbage(0.03)
            site.reply(header, reply)  # ignored: the task is settled by now

        site.serve(answer)
        result = c.wait(300)
        records = c.store()
        rows = list(records.clients())
        records.close()
    check_run(result, rows, "secure", rounds, tally)
    excluded = sorted({r.round for r in rows if _train_failed(rows, r.round)})
    forged = sum(1 for s in target.values() if s is not None)
    tally.streams["secure: rounds with a forged stage"] += forged
    tally.streams["secure: rounds without the fuzzing site's masked input"] += len(excluded)
    compare(result.arrays, _reference(d, excluded, secure=True), "secure", tally)


# ------------------------------------------------------------------------- checks


def check_run(result: Any, rows: list[Any], phase: str, rounds: int, tally: Tally) -> None:
    if [r.ok for r in result.rounds] != [True] * rounds:
        tally.fail(f"{phase}: rounds failed: {[r.error for r in result.rounds if not r.ok]}")
    bad = [r for r in rows if r.client_id != FUZZ_SITE and not r.ok]
    if bad:
        tally.fail(f"{phase}: honest sites failed: {bad[:3]}")
    silent = [r for r in rows if r.client_id == FUZZ_SITE and not r.ok and not r.error]
    if silent:
        tally.fail(f"{phase}: refusals without a reason: {silent[:3]}")


def _reference(d: Deployment, refused: list[int], secure: bool = False) -> Arrays:
    """The clean run: an in-process simulation where site 3 failed the ``refused`` rounds."""
    params: dict[str, Any] = dict(FAULT_PARAMS)
    if refused:
        params |= {"fail_rounds": ",".join(map(str, refused)), "fail_clients": str(FUZZ_SITE)}
    return run_simulation(
        functools.partial(make_app, simulated_data(d.num_sites, d.seed), **params),
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
        secure=SecureAggregation(clip=2.0, max_weight=1000) if secure else None,
    ).arrays


def compare(arrays: Arrays, reference: Arrays, phase: str, tally: Tally) -> None:
    if list(arrays) != list(reference) or any(
        arrays[k].tobytes() != reference[k].tobytes() for k in reference
    ):
        tally.fail(f"{phase}: the global model differs from the clean run's")


def run(
    root: Path, streams: int, plain_rounds: int, secure_rounds: int, seed: int
) -> tuple[Tally, float]:
    """All three phases; returns the tally and the wall time."""
    tally = Tally()
    handler = ErrorLog(tally)
    logging.getLogger("fedlearn").addHandler(handler)
    started = time.monotonic()
    try:
        rng = random.Random(seed)
        if streams:
            peers_phase(root / "peers", streams, rng, tally)
        if plain_rounds:
            plain_phase(root / "plain", plain_rounds, rng, tally)
        if secure_rounds:
            secure_phase(root / "secure", secure_rounds, rng, tally)
    finally:
        logging.getLogger("fedlearn").removeHandler(handler)
    for error in tally.errors_logged:
        tally.fail(f"the coordinator logged an error: {error}")
    return tally, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1200, help="phase 1 streams")
    parser.add_argument("--plain-rounds", type=int, default=60, help="phase 2 rounds")
    parser.add_argument("--secure-rounds", type=int, default=40, help="phase 3 rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the coordinator's warnings are expected
    with tempfile.TemporaryDirectory(prefix="fedlearn-fuzz-") as tmp:
        tally, elapsed = run(
            Path(tmp), args.streams, args.plain_rounds, args.secure_rounds, args.seed
        )
    print(f"messages sent: {tally.total} in {elapsed:.0f} s")
    for label, count in sorted(tally.messages.items()):
        print(f"  {label}: {count}")
    print("stream endings and runs:")
    for label, count in sorted(tally.streams.items()):
        print(f"  {label}: {count}")
    print("Cancels received by the fuzzing site, by answer:")
    for label, count in sorted(tally.cancels.items()):
        print(f"  {label}: {count}")
    print(f"coordinator errors logged: {len(tally.errors_logged)}")
    if tally.problems:
        print("PROBLEMS:")
        for problem in tally.problems:
            print("  " + problem)
        return 1
    print("OK: no crash, every honest task succeeded, every refusal said why, and each run's")
    print("    model is bit for bit the clean run's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
