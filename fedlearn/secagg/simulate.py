"""An in-memory driver of one SecAgg+ round, with dropouts injected at chosen stages.

It plays the transport: delivers each server message to its client, each reply to the
server, and closes a stage once every message has been delivered. Messages travel
through their byte encoding by default, so the wire format is exercised too. A client
listed under a stage in ``drop`` never sends its reply for that stage (nor anything
later): ``Stage.ADVERTISE`` = dropped before advertising keys, ``Stage.SHARE`` = after
advertising, ``Stage.MASKED`` = after sharing, ``Stage.UNMASK`` = after the masked input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeAlias

import numpy as np

from fedlearn.errors import ConfigError, FedlearnError
from fedlearn.secagg.client import SecAggClient
from fedlearn.secagg.config import SecAggConfig, Stage
from fedlearn.secagg.messages import ClientMessage, ServerMessage, decode_message
from fedlearn.secagg.server import SecAggResult, SecAggServer

Message: TypeAlias = ServerMessage | ClientMessage
DropSchedule: TypeAlias = Mapping[Stage | str, Iterable[int]]
Tamper: TypeAlias = Callable[[Message], Message | None]
"""Sees every message in transit; returns it (maybe altered) or None to lose it."""

_STAGES = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.UNMASK)


def _stage(key: Stage | str) -> Stage:
    if isinstance(key, Stage):
        stage = key
    else:
        try:
            stage = Stage[key.upper()]
        except KeyError as exc:
            raise ConfigError(f"unknown secagg stage {key!r}") from exc
    if stage not in _STAGES:
        raise ConfigError(f"clients can only drop at {[s.name for s in _STAGES]}")
    return stage


class SecAggSimulation:
    """One server and its clients in memory; :meth:`run` plays the round."""

    def __init__(
        self,
        updates: Mapping[int, tuple[np.ndarray, int]],
        config: SecAggConfig,
        *,
        round: int = 0,
        serialize: bool = True,
        tamper: Tamper | None = None,
    ) -> None:
        if set(updates) != set(config.clients):
            raise ConfigError("updates must hold exactly one (vector, weight) per client")
        self.config = config
        self.server = SecAggServer(config, round)
        self.clients = {c: SecAggClient(c, round=round) for c in config.clients}
        for c, (vector, weight) in updates.items():
            self.clients[c].set_input(vector, weight)
        self.serialize = serialize
        self.tamper = tamper
        self.client_errors: dict[int, FedlearnError] = {}
        """Clients that refused a server message (they then count as dropped)."""
        self.server_errors: dict[int, FedlearnError] = {}
        """Client messages the server refused."""
        self.received: list[ClientMessage] = []
        """Every client message the server accepted, in order (the server's view)."""

    def _transit(self, msg: Message) -> Message | None:
        if self.serialize:
            msg = decode_message(msg.to_bytes())
        if self.tamper is not None:
            return self.tamper(msg)
        return msg

    def run(self, drop: DropSchedule | None = None) -> SecAggResult:
        """Play the round; raises what the server raises (e.g. RoundFailed)."""
        schedule: dict[Stage, set[int]] = {s: set() for s in _STAGES}
        for key, ids in (drop or {}).items():
            schedule[_stage(key)] |= set(ids)
        gone: set[int] = set()
        outgoing: list[ServerMessage] = list(self.server.start())
        for stage in _STAGES:
            gone |= schedule[stage]
            for msg in outgoing:
                c = msg.client_id
                if c in gone or c in self.client_errors:
                    continue
                delivered = self._transit(msg)
                if delivered is None:
                    continue
                try:
                    reply = self.clients[c].handle(delivered)  # type: ignore[arg-type]
                except FedlearnError as exc:
                    self.client_errors[c] = exc
                    continue
                arrived = self._transit(reply)
                if arrived is None:
                    continue
                try:
                    self.server.receive(arrived)  # type: ignore[arg-type]
                except FedlearnError as exc:
                    self.server_errors[c] = exc
                    continue
                self.received.append(arrived)  # type: ignore[arg-type]
            outgoing = self.server.advance()
        return self.server.result()


def run_secure_sum(
    updates: Mapping[int, tuple[np.ndarray, int]],
    config: SecAggConfig,
    drop: DropSchedule | None = None,
    *,
    round: int = 0,
) -> tuple[np.ndarray, int]:
    """Securely sum ``{client: (vector, weight)}``; returns ``(sum_i w_i x_i, sum_i w_i)``.

    Only the clients that survive to the masked-input stage are in the sum. Raises
    :class:`fedlearn.errors.RoundFailed` when too few clients survive.
    """
    result = SecAggSimulation(updates, config, round=round).run(drop)
    return result.weighted_sum, result.total_weight
