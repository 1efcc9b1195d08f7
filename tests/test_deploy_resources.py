"""Bounded resources of the coordinator against sites that lie about what they send.

Every stage's reply has an expected size (training: the model's; evaluation: none;
secure aggregation: its protocol sizes), checked before anything is allocated; upload
buffers grow with the bytes that actually arrive; and all uploads in flight share one
budget, past which they wait. Here admitted sites declare 3 GiB replies at every stage
and send 10 bytes, or hold half-sent uploads, while honest sites train: the coordinator's
peak RSS must not move, each lie must be refused at once with a reason (recorded, logged,
and told to the site), and the honest sites' rounds must come out as if the liars had
simply failed.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_deploy_faults import fault_deployment

from apps import LogReg
from deployment import (
    Deployment,
    RawStream,
    Running,
    fault_runtime,
    genuine,
    in_process_coordinator,
    join,
    simulated_data,
    site_key,
    upload,
)
from fault_apps import make_app
from fedlearn.deploy.uploads import WAIT_POLL_S, UploadBudget
from fedlearn.engine.coordinator import Coordinator
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord
from fedlearn.errors import ConfigError
from fedlearn.secagg.config import SecAggConfig
from fedlearn.secagg.config import Stage as Protocol
from fedlearn.secagg.messages import (
    AdvertiseKeys,
    decode_message,
    encode_message,
    max_reply_size,
)
from fedlearn.secagg.simulate import SecAggSimulation
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import InProcessTransport, run_simulation
from fedlearn.strategy import FedAvg, build_strategy
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire.convert import stage_from_proto

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DECLARED = 3 * GiB
SECAGG = {"secagg.enabled": True, "secagg.clip": 2.0, "secagg.max_weight": 1000}


# ------------------------------------------------------------------ peak RSS of this process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns that, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmHWM")


def peak_rss_kib() -> int:
    return _status_kib("VmHWM")


# ---------------------------------------------------------------------- sites that lie


class Liar(threading.Thread):
    """An admitted site on a raw stream: honest, except at the stages of ``lies`` (round
    -> stage), where it declares a 3 GiB reply and sends 10 bytes of it."""

    def __init__(self, d: Deployment, channel: grpc.Channel, site: int, lies: dict[int, Stage]):
        super().__init__(name=f"liar-{site}", daemon=True)
        self.d, self.site, self.lies = d, site, lies
        self.raw = RawStream(channel, timeout=120)
        self.lied: list[tuple[int, Stage]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            join(self.raw, site_key(self.d, self.site))
            runtime = fault_runtime(self.d)  # keeps this client's secure-aggregation secrets
            while (task := self.raw.recv_task_message()) is not None:
                header, arrays, message = task
                stage = stage_from_proto(header.stage)
                if self.lies.get(header.round) is stage:
                    self.raw.send(
                        pb.ClientMessage(
                            reply_header=pb.ReplyHeader(
                                task_id=header.task_id,
                                stage=header.stage,
                                round=header.round,
                                num_examples=1,
                                payload_size=DECLARED,
                                message_size=DECLARED if stage.secure else 0,
                            )
                        ),
                        pb.ClientMessage(
                            chunk=pb.Chunk(task_id=header.task_id, index=0, data=b"0123456789")
                        ),
                    )
                    self.lied.append((header.round, stage))
                    continue
                reply = genuine(self.d, header, arrays, self.site, message, runtime)
                self.raw.reply(header.task_id, reply)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def rows(c: Running) -> list[ClientRecord]:
    store = c.store()
    try:
        return list(store.clients())
    finally:
        store.close()


def assert_refused(records: list[ClientRecord], liar: Liar, rnd: int, stage: Stage) -> None:
    """The liar's reply at ``stage`` of ``rnd`` was refused for its declared size."""
    row = [r for r in records if (r.round, r.stage, r.client_id) == (rnd, stage, liar.site)]
    assert len(row) == 1 and not row[0].ok, (rnd, stage, row)
    error = row[0].error or ""
    assert "payload of 3 GiB for task" in error and "exceeds the" in error, error
    assert f"-{stage.value}-c{liar.site}-" in error, error  # the task, and so the stage
    told = [c.reason for c in liar.raw.cancels if f"r{rnd}-{stage.value}-" in c.task_id]
    assert len(told) == 1 and told[0].startswith("upload refused: payload of 3 GiB"), told


def test_sites_declaring_3_gib_at_train_and_evaluate_are_refused_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lies = {1: Stage.TRAIN, 2: Stage.EVALUATE}
    d = fault_deployment(tmp_path, rounds=len(lies), stage_timeout_s=120.0)
    with (
        caplog.at_level(logging.WARNING, logger="fedlearn.server"),
        in_process_coordinator(d) as c,
        c.channel() as channel,
    ):
        c.start_site(0)
        liars = [Liar(d, channel, site, lies) for site in (1, 2)]
        before = reset_peak_rss()
        started = time.monotonic()
        for liar in liars:
            liar.start()
        result = c.wait(110)
        elapsed = time.monotonic() - started
        grown_kib = peak_rss_kib() - before
        records = rows(c)
    for liar in liars:
        liar.join(10)
        assert liar.error is None and liar.lied == list(lies.items())
        for rnd, stage in lies.items():
            assert_refused(records, liar, rnd, stage)
    assert grown_kib < 64 * 1024, grown_kib
    assert elapsed < 60  # refused at once, not at the 120 s stage deadline
    assert [r.ok for r in result.rounds] == [True, True]
    assert all(r.ok for r in records if r.client_id == 0)  # the honest site
    for rnd, stage in lies.items():
        assert f"-{stage.value}-c1-" in caplog.text and f"r{rnd}-" in caplog.text
    # The honest site's rounds: bit for bit a run in which both liars failed round 1.
    reference = run_simulation(
        functools.partial(
            make_app,
            simulated_data(d.num_sites, d.seed),
            **d.params,
            fail_rounds="1",
            fail_clients="1,2",
        ),
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    for name, value in reference.arrays.items():
        assert result.arrays[name].tobytes() == value.tobytes(), name


SECURE_LIES = {
    1: Stage.SECAGG_SETUP,  # the key advertisement (after training)
    2: Stage.SECAGG_KEYS,  # the encrypted shares
    3: Stage.SECAGG_SHARES,  # the masked input
    4: Stage.SECAGG_UNMASK,  # the unmasking shares
}


def test_sites_declaring_3_gib_at_every_secure_stage_are_refused_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 5 sites: k = 4 neighbours, t = 3; the 3 honest ones carry every round
    d = fault_deployment(tmp_path, num_sites=5, rounds=len(SECURE_LIES), stage_timeout_s=120.0)
    with (
        caplog.at_level(logging.WARNING, logger="fedlearn.server"),
        in_process_coordinator(d, SECAGG) as c,
        c.channel() as channel,
    ):
        for site in range(3):
            c.start_site(site)
        liars = [Liar(d, channel, site, SECURE_LIES) for site in (3, 4)]
        before = reset_peak_rss()
        started = time.monotonic()
        for liar in liars:
            liar.start()
        result = c.wait(110)
        elapsed = time.monotonic() - started
        grown_kib = peak_rss_kib() - before
        records = rows(c)
    for liar in liars:
        liar.join(10)
        assert liar.error is None and liar.lied == list(SECURE_LIES.items())
        for rnd, stage in SECURE_LIES.items():
            assert_refused(records, liar, rnd, stage)
    assert grown_kib < 64 * 1024, grown_kib  # was 3 GiB per lying site
    assert elapsed < 60  # refused at once, not at the 120 s stage deadline
    assert [r.ok for r in result.rounds] == [True] * len(SECURE_LIES), result.rounds
    honest = [r for r in records if r.client_id < 3]
    assert honest and all(r.ok for r in honest), [r for r in honest if not r.ok]
    for rnd in SECURE_LIES:  # every honest site's update is in every round's sum
        assert result.rounds[rnd - 1].train_ok >= 3
    assert "rejected reply to 'r1-secagg-setup-c3-" in caplog.text
    assert "rejected reply to 'r4-secagg-unmask-c4-" in caplog.text


# ------------------------------------------------------------ secure-aggregation sizes


@pytest.mark.parametrize(("clients", "length", "bits"), [(5, 31, 32), (12, 1000, 64), (3, 1, 16)])
def test_secagg_reply_limits_hold_every_real_reply(clients: int, length: int, bits: int) -> None:
    ids = [10**12 + 7 * i for i in range(clients)]  # long ids: their digits count
    config = SecAggConfig.create(ids, length, max_weight=50, clip=1.0, modulus_bits=bits)
    rng = np.random.default_rng(0)
    updates = {c: (rng.uniform(-1, 1, length), 1 + c % 50) for c in ids}
    simulation = SecAggSimulation(updates, config, round=2**40)
    simulation.run()
    kinds = {
        "AdvertiseKeys": Protocol.ADVERTISE,
        "ShareKeys": Protocol.SHARE,
        "MaskedInput": Protocol.MASKED,
        "UnmaskShares": Protocol.UNMASK,
    }
    seen = set()
    for msg in simulation.received:
        stage = kinds[type(msg).__name__]
        size, limit = len(msg.to_bytes()), max_reply_size(config, stage)
        assert size <= limit, (stage, size, limit)
        # tight: only the ids' digits (at most 19 each) separate the bound from a reply
        ids_in_reply = 2 + (config.num_neighbours + 1) * (stage is not Protocol.ADVERTISE)
        assert limit - size <= 19 * ids_in_reply + 8, (stage, size, limit)
        seen.add(stage)
    assert seen == set(kinds.values())
    masked = max_reply_size(config, Protocol.MASKED)
    assert masked > (length + 1) * bits // 8 and masked < (length + 1) * 8 + 200
    with pytest.raises(ValueError, match="no client reply"):
        max_reply_size(config, Protocol.DONE)


# ----------------------------------------------------------------------- upload budget


def _charge_in_thread(
    budget: UploadBudget, size: int, gone: Callable[[], bool] = lambda: False
) -> tuple[Any, threading.Thread, list[bool]]:
    account = budget.open()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(budget.charge(account, size, gone)))
    thread.start()
    return account, thread, result


def _waiting(budget: UploadBudget, count: int) -> None:
    deadline = time.monotonic() + 5
    while budget.waits < count and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # and is blocked in its wait, not on its way out


def test_budget_charges_what_arrives_and_gives_it_back() -> None:
    budget = UploadBudget(100)
    a, b = budget.open(), budget.open()
    assert budget.charge(a, 60, lambda: False) and budget.charge(b, 40, lambda: False)
    assert (budget.used, budget.peak, budget.waits) == (100, 100, 0)
    budget.release(a)
    budget.release(a)  # idempotent
    assert budget.used == 40 and not budget.charge(a, 1, lambda: False)  # a has ended
    budget.release(b)
    assert budget.used == 0 and budget.peak == 100
    with pytest.raises(ConfigError, match="positive int"):
        UploadBudget(0)


def test_budget_past_the_limit_waits_in_order_and_never_deadlocks() -> None:
    budget = UploadBudget(100)
    first = budget.open()
    assert budget.charge(first, 80, lambda: False)
    # over the limit: the first waiter takes the overdraft and goes on at once
    second = budget.open()
    assert budget.charge(second, 50, lambda: False) and budget.used == 130
    assert budget.waits == 1
    # the next one waits: no overdraft left, no room
    third, thread, result = _charge_in_thread(budget, 10)
    _waiting(budget, 2)
    assert result == [] and thread.is_alive()
    # a small charge that would fit must not overtake the waiter... and it cannot: none fits
    budget.release(first)  # 50 used: the waiter fits now
    thread.join(5)
    assert result == [True] and budget.used == 60
    # the overdraft holder goes on past the limit until its upload ends
    assert budget.charge(second, 100, lambda: False) and budget.used == 160
    budget.release(second)
    budget.release(third)
    assert budget.used == 0 and budget.peak == 160  # the limit plus one upload


def test_budget_waiters_do_not_overtake_and_end_when_their_upload_ends() -> None:
    budget = UploadBudget(100)
    holder, overdraft = budget.open(), budget.open()
    assert budget.charge(holder, 90, lambda: False)
    assert budget.charge(overdraft, 20, lambda: False)  # takes the overdraft: 110 used
    big, big_thread, big_result = _charge_in_thread(budget, 85)
    _waiting(budget, 2)
    budget.release(holder)  # 20 used: still no room for 85, and the overdraft is taken
    time.sleep(0.05)
    assert big_thread.is_alive()
    # 10 would fit, but the waiter came first: no overtaking
    small, small_thread, small_result = _charge_in_thread(budget, 10)
    _waiting(budget, 3)
    assert small_thread.is_alive() and small_result == []
    budget.release(overdraft)  # the waiter takes the overdraft, then the small one fits
    big_thread.join(5)
    small_thread.join(5)
    assert big_result == [True] and small_result == [True] and budget.used == 95
    # a waiter whose upload is abandoned (released) or whose site leaves stops waiting
    over = budget.open()
    assert budget.charge(over, 50, lambda: False)  # the overdraft again: 145 used
    abandoned, thread, result = _charge_in_thread(budget, 50)
    _waiting(budget, 5)
    budget.release(abandoned)
    thread.join(5)
    assert result == [False] and not thread.is_alive()
    gone = threading.Event()
    _, thread, result = _charge_in_thread(budget, 50, gone.is_set)
    _waiting(budget, 6)
    gone.set()
    thread.join(WAIT_POLL_S + 5)
    assert result == [False] and budget.used == 145
    for account in (big, small, over):
        budget.release(account)
    assert budget.used == 0


def test_half_sent_uploads_hold_only_what_arrived_and_honest_sites_go_on(tmp_path: Path) -> None:
    # A model of about 768 KiB, a 1 MiB budget. Two liars each send half of a genuine
    # upload and stop: together they hold the whole budget until the stage deadline.
    # The three honest sites (1.5 s late, so the liars are first) still upload, one
    # after another on the overdraft, and their round is a run in which the liars failed.
    pad = 96 * KiB  # float64 values
    d = fault_deployment(
        tmp_path, num_sites=5, rounds=1, stage_timeout_s=6.0, params={"lr": 0.5, "pad": pad}
    )
    with (
        in_process_coordinator(d, {"server.max_inflight_upload_mb": 1}) as c,
        c.channel() as channel,
    ):
        for site in range(3):
            c.start_site(site, sleep_round=1, sleep_s=1.5)
        streams = []
        for site in (3, 4):
            raw = RawStream(channel, timeout=60)
            join(raw, site_key(d, site))
            streams.append((site, raw))
        for site, raw in streams:
            task = raw.recv_task_message()
            assert task is not None
            header, arrays, message = task
            reply = genuine(d, header, arrays, site, message, fault_runtime(d))
            reply_header, chunks = upload(header.task_id, reply, chunk_size=256 * KiB)
            assert len(chunks) == 4
            raw.send(pb.ClientMessage(reply_header=reply_header))
            raw.send(*(pb.ClientMessage(chunk=chunk) for chunk in chunks[:2]))
        # the evaluation: answered honestly
        for site, raw in streams:
            while (task := raw.recv_task_message()) is not None:
                header, arrays, message = task
                raw.reply(header.task_id, genuine(d, header, arrays, site, message))
        result = c.wait(60)
        budget = c.servicer.budget  # type: ignore[union-attr]
        records = rows(c)
    model = sum(v.nbytes for v in d.initial.values())
    assert budget.limit == MiB and budget.used == 0  # everything given back
    assert budget.waits >= 3  # every honest upload found the budget spent
    assert MiB <= budget.peak <= MiB + model + 4 * KiB  # never more than one upload over
    assert result.rounds[0].ok and result.rounds[0].train_ok == 3
    train = {r.client_id: r for r in records if r.stage is Stage.TRAIN}
    assert all(train[i].ok for i in range(3))
    assert all("no reply within the stage deadline" in (train[i].error or "") for i in (3, 4))
    reference = run_simulation(
        functools.partial(
            make_app,
            simulated_data(d.num_sites, d.seed),
            **d.params,
            fail_rounds="1",
            fail_clients="3,4",
        ),
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    for name, value in reference.arrays.items():
        assert result.arrays[name].tobytes() == value.tobytes(), name


# ------------------------------------------------ a secure reply must be its sender's


@dataclass
class Impersonating(InProcessTransport):
    """Client 3's key advertisement claims to come from client 5 (answered later)."""

    def __post_init__(self) -> None:
        super().__init__(LogReg)

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        for reply in super().execute(broadcast, tasks):
            if reply.stage is Stage.SECAGG_SETUP and reply.client_id == 3:
                msg = decode_message(reply.payload)
                assert isinstance(msg, AdvertiseKeys)
                forged = AdvertiseKeys(msg.round, 5, msg.c_pk, msg.s_pk)
                reply = replace(reply, payload=encode_message(forged))
            yield reply


def test_a_secure_reply_claiming_another_client_is_refused() -> None:
    secure = SecureAggregation(clip=2.0, max_weight=100)
    result = Coordinator(FedAvg(), Impersonating(), list(range(12)), 1, seed=3, secure=secure).run(
        LogReg().initial_arrays(0)
    )
    failed = {(c.stage, c.client_id): c.error for c in result.clients if not c.ok}
    assert list(failed) == [(Stage.SECAGG_SETUP, 3)], failed  # client 5 is unharmed
    assert "client 3 sent a secure-aggregation message as client 5" in str(failed.values())
    assert result.rounds[0].ok and result.rounds[0].train_ok == 11
