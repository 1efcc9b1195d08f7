"""A run's privacy accounting: each committed round's DP events, ε, and the budget.

The run lifecycle asks a :class:`PrivacyTracker` for the row to commit with each round
(:meth:`PrivacyTracker.record`), rebuilds it from the stored rows when a run resumes
(:meth:`PrivacyTracker.restore`), and asks it before each round whether the round may run
(:meth:`PrivacyTracker.stop_reason`: not when it would take ε past ``privacy.budget``).

Which events a round costs, by ``privacy.mode``:

* ``central``: every round that ran its training stage, applied or not (conservative):
  :func:`~fedlearn.privacy.accountant.round_event` with the round's actual population
  (the clients it selected from) and sample size;
* ``distributed``: every applied round, ``distributed_event(survivors)`` with the number
  of clients whose masked inputs the sum holds (the ``dp.survivors`` train metric that
  :class:`~fedlearn.privacy.strategy.CountedSum` records); a round that failed unmasked
  nothing;
* ``local`` and ``example``: each client whose training reply was accepted, from the
  ``dp.*`` metrics it returned (:func:`~fedlearn.privacy.accountant.client_event`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dp_accounting import dp_event

from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import PrivacyRow
from fedlearn.errors import ConfigError
from fedlearn.privacy.accountant import (
    AccountantKind,
    DpEvent,
    Ledger,
    Relation,
    Sampling,
    client_event,
    event_from_json,
    event_to_json,
    relation_for,
    round_event,
)
from fedlearn.privacy.strategy import SURVIVORS_KEY

Mode = Literal["central", "local", "distributed", "example"]

#: Registry metric names of a published version's guarantee.
EPSILON_METRIC = "dp.epsilon"
DELTA_METRIC = "dp.delta"


@dataclass(frozen=True)
class PrivacySettings:
    """What the accountant needs to know about a run's mechanism."""

    mode: Mode
    noise_multiplier: float
    delta: float
    accountant: AccountantKind = "rdp"
    sampling: Sampling = "fixed"
    rate: float = 1.0
    """Poisson: each client's probability of taking part (``fraction_train``)."""
    num_clients: int = 1
    """The client population (simulation: ``run.clients``; coordinator: the allowlist)."""
    clients_per_round: int = 1
    """Fixed sampling: how many clients a round selects."""
    worst_survivors: int = 1
    """Distributed: the fewest survivors with which a round can still apply."""
    budget: float | None = None


class PrivacyTracker:
    """The ledger of one run, fed round by round (see the module docstring)."""

    def __init__(
        self,
        settings: PrivacySettings,
        distributed_event: Callable[[int], DpEvent] | None = None,
    ) -> None:
        s = settings
        if s.mode == "distributed" and distributed_event is None:
            raise ConfigError("privacy.mode = 'distributed' needs the distributed mechanism")
        if s.accountant == "pld" and s.sampling == "fixed" and s.mode in ("central", "distributed"):
            raise ConfigError(
                "privacy: fixed-size client sampling (sampling = 'fixed') is accounted under "
                "replace-one neighbours, which only the RDP accountant supports; set "
                "privacy.accountant = 'rdp', or privacy.sampling = 'poisson' for PLD"
            )
        self.settings = s
        self.distributed_event = distributed_event
        relation = (
            relation_for(s.sampling)
            if s.mode in ("central", "distributed")
            else Relation.ADD_OR_REMOVE_ONE
        )
        self.ledger = Ledger(s.accountant, s.delta, relation)
        self.rows: list[PrivacyRow] = []
        self._json: dict[DpEvent, dict[str, Any]] = {}
        self._population = s.num_clients
        if s.mode == "central":
            self.ledger.check(self._central_event(s.num_clients, s.clients_per_round))

    # ------------------------------------------------------------------ events

    def _central_event(self, population: int, sample_size: int) -> DpEvent:
        s = self.settings
        return round_event(
            s.noise_multiplier,
            s.sampling,
            rate=s.rate,
            population=population,
            sample_size=sample_size,
        )

    def round_events(
        self, record: RoundRecord, clients: Sequence[ClientRecord]
    ) -> tuple[DpEvent | None, dict[int, DpEvent]]:
        """The run-level event and per-client events of a committed round."""
        mode = self.settings.mode
        if mode == "central":
            population = (
                self.settings.num_clients if record.candidates is None else len(record.candidates)
            )
            self._population = population
            if population == 0:
                return None, {}
            return self._central_event(population, record.train_selected), {}
        if mode == "distributed":
            assert self.distributed_event is not None
            if not record.ok:
                return None, {}
            survivors = record.train_metrics.get(SURVIVORS_KEY, record.train_ok)
            return self.distributed_event(int(survivors)), {}
        events = {
            c.client_id: client_event(c.metrics)
            for c in clients
            if c.stage is Stage.TRAIN and c.ok and c.round == record.round
        }
        return None, events

    def next_epsilon(self) -> float | None:
        """ε if the next round runs, in the worst case over who takes part and survives
        (None when it cannot be known yet: example-level DP before any client reported)."""
        s = self.settings
        if s.mode == "central":
            event = self._central_event(self._population, s.clients_per_round)
            return self.ledger.epsilon_if(event)
        if s.mode == "distributed":
            assert self.distributed_event is not None
            return self.ledger.epsilon_if(self.distributed_event(s.worst_survivors))
        if s.mode == "local":
            return self.ledger.epsilon_if(
                any_client=[dp_event.GaussianDpEvent(s.noise_multiplier / 2)]
            )
        last = {repr(e[-1]): e[-1] for e in self.ledger.client_events.values() if e}
        if not last:
            return None
        return self.ledger.epsilon_if(any_client=list(last.values()))

    # ------------------------------------------------------------------ rounds

    def record(self, record: RoundRecord, clients: Sequence[ClientRecord]) -> PrivacyRow:
        """Add a committed round to the ledger; returns the row to commit with it."""
        run_event, client_events = self.round_events(record, clients)
        self.ledger.add_round(run_event, client_events)
        row = PrivacyRow(
            round=record.round,
            epsilon=self.ledger.epsilon(),
            delta=self.settings.delta,
            accountant=self.settings.accountant,
            events={
                "run": None if run_event is None else event_to_json(run_event),
                "clients": {str(c): self._to_json(e) for c, e in sorted(client_events.items())},
            },
        )
        self.rows.append(row)
        return row

    def _to_json(self, event: DpEvent) -> dict[str, Any]:
        """:func:`event_to_json`, once per distinct event (a round's clients share one)."""
        try:
            found = self._json.get(event)
        except TypeError:  # not hashable
            return event_to_json(event)
        if found is None:
            found = self._json[event] = event_to_json(event)
        return found

    def restore(self, rows: Sequence[PrivacyRow]) -> None:
        """Rebuild the ledger from a resumed run's stored rows, in round order."""
        for row in sorted(rows, key=lambda r: r.round):
            events: Mapping[str, Any] = row.events
            run = events.get("run")
            clients = events.get("clients") or {}
            self.ledger.add_round(
                None if run is None else event_from_json(run),
                {int(c): event_from_json(e) for c, e in clients.items()},
            )
            self.rows.append(row)

    def epsilon(self) -> float:
        """ε of the rounds so far."""
        return self.ledger.epsilon()

    def epsilon_at(self, round: int) -> float | None:
        """ε after committed round ``round`` (None if it has no row)."""
        for row in self.rows:
            if row.round == round:
                return row.epsilon
        return None

    def metrics_at(self, round: int) -> dict[str, float]:
        """``dp.epsilon`` and ``dp.delta`` of the model as of ``round`` (for a registry)."""
        eps = self.epsilon_at(round)
        if eps is None:
            eps = self.epsilon()
        if not math.isfinite(eps):  # no guarantee: a gate with max_epsilon refuses it
            return {}
        return {EPSILON_METRIC: eps, DELTA_METRIC: self.settings.delta}

    # ------------------------------------------------------------------ budget

    def check_budget(self) -> None:
        """ConfigError when a single round already costs more than ``privacy.budget``."""
        budget = self.settings.budget
        if budget is None or self.ledger.run_events or self.ledger.client_events:
            return
        first = self.next_epsilon()
        if first is not None and first > budget:
            raise ConfigError(
                f"privacy.budget = {budget:g} is exceeded by round 1 alone (ε = {first:.4g} "
                f"at δ = {self.settings.delta:g}); raise the budget or noise_multiplier, or "
                "sample fewer clients per round"
            )

    def stop_reason(self, round: int) -> str | None:
        """Why round ``round`` must not run (it would take ε past the budget), or None."""
        budget = self.settings.budget
        if budget is None:
            return None
        after = self.next_epsilon()
        if after is None or not after > budget:
            return None
        now = self.epsilon()
        shown = "inf" if math.isinf(after) else f"{after:.4g}"
        return (
            f"privacy budget reached: round {round} would bring ε to {shown} > budget "
            f"{budget:g} (δ = {self.settings.delta:g}); training stopped after round "
            f"{round - 1} at ε = {now:.4g}. Raise privacy.budget to continue."
        )
