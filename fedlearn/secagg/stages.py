"""Secure aggregation as coordinator stages: the glue between the sans-IO protocol and a round.

A secure training round is four exchanges over any transport (``Stage.SECAGG_*``):

1. ``secagg-setup``: each selected client trains on the global model, keeps its update
   (as a weighted delta from the global model) inside its SecAggClient and answers with
   its public keys;
2. ``secagg-keys``: it receives its neighbours' keys and answers with encrypted shares;
3. ``secagg-shares``: it receives the shares meant for it and answers with its masked input;
4. ``secagg-unmask``: survivors answer with the shares that remove the masks.

The coordinator learns ``sum_i w_i delta_i`` and ``sum_i w_i`` only, and adds the weighted
mean delta to the global model. A client's secrets never leave the runtime that holds it.

With distributed DP (``SecureAggregation.noise``) every client clips its delta to L2 norm
``clip``, adds its share of Skellam noise and sends weight 1 before masking, so the
coordinator learns only the noised sum of the survivors and their number; each finished
round is reported to ``SecureAggregation.on_round`` as a :class:`SecureRound`, whose
:meth:`SecureRound.event` is the round's DpEvent for the accountant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from fedlearn.drift.codec import pack_secure, secure_length, unpack_secure
from fedlearn.drift.stats import DataSummary, SummarySpec
from fedlearn.engine.client_app import ClientApp, ClientContext, TrainResult
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, Metrics, check_scalars
from fedlearn.engine.results import ClientRecord, accepted_train
from fedlearn.errors import ConfigError, FedlearnError, SecAggError, UpdateRejected
from fedlearn.privacy.distributed import (
    DistributedNoise,
    Neighbours,
    RoundNoise,
    distributed_event,
)
from fedlearn.secagg.client import SecAggClient
from fedlearn.secagg.config import SecAggConfig
from fedlearn.secagg.config import Stage as Protocol
from fedlearn.secagg.messages import (
    ClientMessage,
    ServerMessage,
    Setup,
    decode_message,
    encode_message,
    max_reply_size,
)
from fedlearn.secagg.quantize import flatten, unflatten
from fedlearn.secagg.server import SecAggServer
from fedlearn.strategy.base import ClientUpdate, Strategy

if TYPE_CHECKING:
    import dp_accounting

SECURE_STAGES = (Stage.SECAGG_SETUP, Stage.SECAGG_KEYS, Stage.SECAGG_SHARES, Stage.SECAGG_UNMASK)
REPLY_OF = {
    Stage.SECAGG_SETUP: Protocol.ADVERTISE,
    Stage.SECAGG_KEYS: Protocol.SHARE,
    Stage.SECAGG_SHARES: Protocol.MASKED,
    Stage.SECAGG_UNMASK: Protocol.UNMASK,
}
"""The protocol reply each secure stage waits for (the setup stage trains, then advertises)."""


@dataclass(frozen=True, kw_only=True)
class SecureAggregation:
    """Settings of secure aggregation (one per run; each round gets a fresh SecAggConfig).

    ``clip`` bounds each coordinate of a client's change to the model; ``max_weight``
    bounds ``num_examples`` (a client above it is refused); ``modulus_bits`` is the ring
    of the masked sum; ``neighbours`` (k) and ``threshold`` (t) default to SecAgg+'s
    ``k = 2 ceil(log2 n)`` and a strict majority of ``k + 1``.

    ``noise`` turns on distributed DP (:mod:`fedlearn.privacy.distributed`): ``clip`` is
    then the L2 clip ``C`` of each client's change and each client adds its Skellam
    share before masking, with weight 1 (``max_weight`` is then unused); ``scale_bits``
    (default: the largest whose noised sum cannot wrap) is the fixed-point precision.
    ``on_round`` is called with a :class:`SecureRound` after every round whose sum was
    revealed (the accountant's hook): as soon as the server has unmasked it, before the
    model changes, so a round that fails afterwards (quorum, server update) is still on
    the ledger - its noised sum was seen. A round that aborts earlier reveals nothing and
    is not reported.
    """

    clip: float = 1.0
    max_weight: int = 100_000
    modulus_bits: int = 32
    neighbours: int | None = None
    threshold: int | None = None
    noise: DistributedNoise | None = None
    scale_bits: int | None = None
    on_round: Callable[[SecureRound], None] | None = field(default=None, compare=False, repr=False)

    def with_noise(
        self,
        noise: DistributedNoise | None,
        clip: float,
        on_round: Callable[[SecureRound], None] | None = None,
    ) -> SecureAggregation:
        """These settings with distributed DP: L2 clip ``clip`` (``privacy.clip``)."""
        if noise is None:
            return self
        return replace(self, noise=noise, clip=clip, on_round=on_round)

    def planned_noise(self, clients: int, vector_length: int) -> RoundNoise | None:
        """The distributed-DP calibration a round of ``clients`` over ``vector_length``
        parameters will use (None without noise): e.g. for the epsilon a round would cost
        before it runs (``distributed_event(noise, clients)``)."""
        return self.round_config(list(range(clients)), vector_length, 0, 0).round_noise

    def check(self, strategy: Strategy, clients_per_round: int) -> None:
        """ConfigError unless ``strategy`` aggregates by a plain weighted mean."""
        base = strategy
        while isinstance(getattr(base, "inner", None), Strategy):  # a privacy wrapper
            base = base.inner  # type: ignore[attr-defined]
        plain_fold = type(strategy).start_fold is Strategy.start_fold and all(
            getattr(type(base), hook) is getattr(Strategy, hook)
            for hook in ("train_arrays", "client_train_config")
        )
        if not strategy.linear or not plain_fold:
            raise ConfigError(
                f"secure aggregation needs a linear weighted-mean strategy (FedAvg, FedProx, "
                f"FedAvgM, FedAdam, FedYogi, FedAdagrad); {type(strategy).__name__} "
                "aggregates differently"
            )
        if clients_per_round < 3:
            raise ConfigError("secure aggregation needs at least 3 clients per round")
        expected = None if self.noise is None else self.noise.expected_clients
        if expected is not None and expected > clients_per_round:
            raise ConfigError(
                f"distributed DP expects {expected} surviving clients but only "
                f"{clients_per_round} are selected per round: the noise could never reach "
                "its target"
            )
        self.round_config(list(range(clients_per_round)), 1, 0, 0)

    def round_config(self, clients: list[int], length: int, seed: int, rnd: int) -> SecAggConfig:
        """The public parameters of one round; the graph seed is derived from the run seed."""
        graph_seed = hashlib.sha256(f"fedlearn-secagg-graph/{seed}/{rnd}".encode()).digest()
        return SecAggConfig.create(
            clients,
            length,
            max_weight=self.max_weight,
            clip=self.clip,
            num_neighbours=self.neighbours,
            threshold=self.threshold,
            modulus_bits=self.modulus_bits,
            scale_bits=self.scale_bits,
            graph_seed=graph_seed,
            noise=self.noise,
        )


@dataclass(frozen=True)
class SecureRound:
    """What a finished secure round revealed, for the privacy ledger."""

    round: int
    survivors: frozenset[int]
    """Clients whose masked input (and noise share) is in the sum."""
    noise: RoundNoise | None
    """The round's distributed-DP calibration; None without distributed DP."""

    def event(
        self, neighbours: Neighbours = "add_or_remove", *, integer_orders: bool = False
    ) -> dp_accounting.DpEvent:
        """The round's ZCDpEvent (:func:`fedlearn.privacy.distributed.distributed_event`)."""
        if self.noise is None:
            raise ConfigError("this secure round added no distributed-DP noise")
        return distributed_event(
            self.noise, len(self.survivors), neighbours, integer_orders=integer_orders
        )

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise in the revealed sum (model units)."""
        return 0.0 if self.noise is None else self.noise.noise_std(len(self.survivors))


# ------------------------------------------------------------------------ client side


class SecureClientStates:
    """The SecAggClients a runtime holds, one per (round, client id)."""

    def __init__(self) -> None:
        self._clients: dict[tuple[int, int], SecAggClient] = {}

    def handle(
        self,
        task: Task,
        arrays: Arrays,
        app: ClientApp,
        ctx: ClientContext,
        summary: tuple[SummarySpec, DataSummary] | None = None,
    ) -> tuple[bytes, int, Metrics]:
        """Answer one secure stage: (client message bytes, num_examples, metrics).

        ``summary`` (the drift settings and this client's data summary) is appended to
        the update, so it reaches the coordinator only inside the secure sum
        (:mod:`fedlearn.drift.codec`)."""
        msg = _server_message(task.payload)
        key = (task.round, task.client_id)
        if task.stage is Stage.SECAGG_SETUP:
            self._clients = {k: v for k, v in self._clients.items() if k[0] >= task.round}
            result = app.train(arrays, task.config, ctx)
            delta, weight = _weighted_delta(result, arrays, msg)
            if summary is not None:
                assert isinstance(msg, Setup)  # _weighted_delta checked it
                if msg.config.noise is not None:
                    raise ConfigError("drift statistics cannot be added under distributed DP")
                delta = np.concatenate(
                    [delta, pack_secure(summary[1], summary[0], msg.config.clip)]
                )
            client = SecAggClient(task.client_id, round=task.round)
            client.set_input(delta, weight)
            self._clients[key] = client
            reply = client.handle(msg)
            return encode_message(reply), weight, check_scalars(result.metrics, "metrics")
        held = self._clients.get(key)
        if held is None:
            raise SecAggError(f"no secure-aggregation state for round {task.round} here")
        reply = held.handle(msg)
        if task.stage is Stage.SECAGG_UNMASK:
            del self._clients[key]
        return encode_message(reply), 0, {}


def _server_message(payload: bytes) -> ServerMessage:
    msg = decode_message(payload)
    if not isinstance(msg, ServerMessage):
        raise SecAggError(f"a client does not take {type(msg).__name__}")
    return msg


def _weighted_delta(
    result: TrainResult, global_arrays: Arrays, setup: ServerMessage
) -> tuple[np.ndarray, int]:
    if not isinstance(result, TrainResult):
        raise TypeError(f"train() must return TrainResult, not {type(result).__name__}")
    if not isinstance(setup, Setup):
        raise SecAggError("training happens at the setup stage only")
    from fedlearn.engine.validation import check_update

    update = check_update(
        Reply(
            Stage.TRAIN,
            setup.round,
            setup.client_id,
            int(result.num_examples),
            {k: np.asarray(v) for k, v in result.arrays.items()},
        ),
        global_arrays,
    )
    if update.num_examples > setup.config.max_weight and setup.config.noise is None:
        raise UpdateRejected(
            f"num_examples {update.num_examples} exceeds secure aggregation's max_weight "
            f"{setup.config.max_weight}"
        )
    total = sum(a.size for a in global_arrays.values())
    delta = np.empty(total, np.float64)
    offset = 0
    for name, old in global_arrays.items():  # one pass per array, no intermediate copies
        size = old.size
        np.subtract(
            update.arrays[name].reshape(-1),
            old.reshape(-1),
            out=delta[offset : offset + size],
            dtype=np.float64,
        )
        offset += size
    return delta, update.num_examples


# ------------------------------------------------------------------------ server side

Exchange = Callable[[Stage, list[Task], Arrays], Iterator[Reply]]
Note = Callable[["ClientRecord"], None]


def secure_mean(
    secure: SecureAggregation,
    *,
    rnd: int,
    seed: int,
    selected: list[int],
    global_arrays: Arrays,
    config: dict[str, object],
    exchange: Exchange,
    task_seed: Callable[[Stage, int], int],
    note: Note,
    data_stats: SummarySpec | None = None,
    on_stats: Callable[[DataSummary], None] | None = None,
) -> tuple[Arrays, list[ClientUpdate]]:
    """Run the four stages; return the new global model's weighted mean and the accepted
    clients' metadata (no arrays). RoundFailed if too few clients survive.

    With ``data_stats`` every client appends its data summary to its update; the
    population's summary (the sum over the survivors, all the coordinator learns) goes to
    ``on_stats``."""
    vector, spec = flatten(global_arrays)
    extra = 0
    if data_stats is not None:
        if secure.noise is not None:
            raise ConfigError(
                "drift statistics cannot ride in the secure sum under distributed DP (they "
                "would break its L2 clipping): turn [drift] off or use another privacy mode"
            )
        extra = secure_length(data_stats)
    server = SecAggServer(secure.round_config(selected, vector.size + extra, seed, rnd), rnd)
    outgoing: list[ServerMessage] = list(server.start())
    accepted: dict[int, ClientUpdate] = {}
    for stage in SECURE_STAGES:
        # a reply larger than its protocol size is refused before a byte of it is buffered
        limit = max_reply_size(server.config, REPLY_OF[stage])
        tasks = [
            Task(
                stage,
                rnd,
                m.client_id,
                # training at the setup stage uses the plain training seed: the same update
                task_seed(Stage.TRAIN if stage is Stage.SECAGG_SETUP else stage, m.client_id),
                dict(config) if stage is Stage.SECAGG_SETUP else {},  # type: ignore[arg-type]
                encode_message(m),
                reply_limit=limit,
            )
            for m in outgoing
        ]
        broadcast = global_arrays if stage is Stage.SECAGG_SETUP else {}
        for reply in exchange(stage, tasks, broadcast):
            try:
                if not reply.ok:
                    raise SecAggError(str(reply.error))
                msg = decode_message(reply.payload)
                if msg.client_id != reply.client_id:  # the transport knows who sent it
                    raise SecAggError(
                        f"client {reply.client_id} sent a secure-aggregation message as "
                        f"client {msg.client_id}"
                    )
                server.receive(msg)  # type: ignore[arg-type]
            except FedlearnError as exc:
                note(ClientRecord(rnd, stage, reply.client_id, False, error=str(exc)))
                accepted.pop(reply.client_id, None)
                continue
            if stage is Stage.SECAGG_SETUP:
                accepted[reply.client_id], record = accepted_train(rnd, reply)
                note(record)
        outgoing = server.advance()  # RoundFailed when too few survive
    result = server.result()
    if secure.on_round is not None:
        secure.on_round(SecureRound(rnd, result.survivors, server.config.round_noise))
    mean = result.mean()
    if data_stats is not None:
        tail = result.weighted_sum[vector.size :]
        population = unpack_secure(tail, result.total_weight, data_stats, server.config.clip)
        if on_stats is not None:
            on_stats(population)
        mean = mean[: vector.size]
    mean_delta = unflatten(mean, spec)
    new = {name: _add(global_arrays[name], mean_delta[name]) for name in global_arrays}
    survivors = [accepted[c] for c in sorted(result.survivors) if c in accepted]
    return new, survivors


def _add(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    total = base.astype(np.float64) + delta.astype(np.float64)
    return np.asarray(total if base.dtype.kind == "f" else np.rint(total)).astype(base.dtype)


__all__ = [
    "SECURE_STAGES",
    "ClientMessage",
    "SecureAggregation",
    "SecureClientStates",
    "SecureRound",
    "secure_mean",
]
