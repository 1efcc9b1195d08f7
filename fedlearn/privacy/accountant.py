"""The privacy ledger: every DP mechanism of a run as a dp-accounting event, composed into ε.

Each mechanism is described as a :class:`dp_accounting.DpEvent` (the common language of
the three DP modes) and the :class:`Ledger` composes them with dp-accounting's RDP or PLD
accountant (``privacy.accountant``), reporting ε at ``privacy.delta``:

* **run-level** events protect every client at once (central DP, distributed DP): one
  event per round, e.g. ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``;
* **per-client** events protect one client's own data (local DP, example-level DP-SGD):
  a client's ε composes the run-level events with its own, and the run's ε is the
  largest over clients.

Composition is order-free, so the ledger groups equal events and composes each group
once with its count (``compose(event, count)``, ``SelfComposedDpEvent`` unwrapped): a run
of R identical rounds gives exactly the ε of dp-accounting called with that event and R.

Neighbouring relations: Poisson sampling is ADD_OR_REMOVE_ONE (a client is there or not,
the clipped sum moves by at most C); fixed-size sampling is REPLACE_ONE (a client is
swapped for another, the sum moves by up to 2C, so the Gaussian event's noise multiplier
is σ/2) and only dp-accounting's RDP accountant supports it.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attr
import dp_accounting
import numpy as np
from dp_accounting import NeighboringRelation as Relation
from dp_accounting import dp_event
from dp_accounting.dp_event import DpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant, compute_epsilon

from fedlearn.engine.records import Metrics
from fedlearn.errors import ConfigError, SerializationError


def _keep_absl_off_borrowed_streams() -> None:
    """dp-accounting logs through absl, whose handler keeps the ``sys.stderr`` of the
    moment absl was imported and *closes* it when logging is reconfigured
    (``logging.config.dictConfig``, as uvicorn does when fedlearn serves a model) unless
    it is the current ``sys.stderr``. Imported under a redirected stderr (a test runner's
    capture, click's CliRunner) that would close someone else's stream; the process's own
    stderr is never closed."""
    from absl import logging as absl_logging

    if sys.__stderr__ is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_keep_absl_off_borrowed_streams()

AccountantKind = Literal["rdp", "pld"]
Sampling = Literal["fixed", "poisson"]

#: Train-metric keys a client returns under local or example-level DP (the client part
#: writes them): what it applied, so the coordinator can account for it.
NOISE_MULTIPLIER = "dp.noise_multiplier"
CLIP = "dp.clip"
SAMPLE_RATE = "dp.sample_rate"
STEPS = "dp.steps"
EPSILON = "dp.epsilon"


def relation_for(sampling: Sampling) -> Relation:
    """The neighbouring relation a client-sampling scheme is analysed under."""
    return Relation.ADD_OR_REMOVE_ONE if sampling == "poisson" else Relation.REPLACE_ONE


def make_accountant(kind: AccountantKind, relation: Relation) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant (RDP with its default orders, or PLD)."""
    if kind == "rdp":
        return RdpAccountant(neighboring_relation=relation)
    if kind == "pld":
        return PLDAccountant(neighboring_relation=relation)
    raise ConfigError(f"privacy.accountant must be 'rdp' or 'pld', got {kind!r}")


def round_event(
    noise_multiplier: float,
    sampling: Sampling,
    *,
    rate: float = 1.0,
    population: int = 1,
    sample_size: int = 1,
) -> DpEvent:
    """One round of a Gaussian sum of clipped updates with noise ``σ·C`` (central DP).

    ``poisson``: each client takes part with probability ``rate``;
    ``fixed``: ``sample_size`` of ``population`` clients without replacement (REPLACE_ONE,
    sensitivity 2C, hence ``GaussianDpEvent(σ/2)``).
    """
    if sampling == "poisson":
        return dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SampledWithoutReplacementDpEvent(
        population, min(sample_size, population), dp_event.GaussianDpEvent(noise_multiplier / 2)
    )


def _number(metrics: Metrics, key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def client_event(metrics: Metrics) -> DpEvent:
    """A client's DP event for one round, from the ``dp.*`` train metrics it returned.

    Example-level DP-SGD (``dp.sample_rate`` and ``dp.steps`` present):
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``.
    Local DP (``dp.noise_multiplier`` only): one Gaussian release of the update with noise
    ``σ·C`` and sensitivity 2C (any two of the client's datasets), ``GaussianDpEvent(σ/2)``.
    A client that reports no valid noise multiplier gets ``NonPrivateDpEvent`` (ε = ∞).
    """
    return _client_event(
        _number(metrics, NOISE_MULTIPLIER), _number(metrics, SAMPLE_RATE), _number(metrics, STEPS)
    )


@functools.lru_cache(maxsize=1024)
def _client_event(sigma: float | None, rate: float | None, steps: float | None) -> DpEvent:
    """:func:`client_event` from its numbers (one event object per distinct mechanism)."""
    if sigma is None or not math.isfinite(sigma) or sigma <= 0:
        return dp_event.NonPrivateDpEvent()
    if rate is None and steps is None:
        return dp_event.GaussianDpEvent(sigma / 2)
    if rate is None or steps is None or not 0 <= rate <= 1 or steps < 0 or steps != int(steps):
        return dp_event.NonPrivateDpEvent()
    inner = dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma))
    return dp_event.SelfComposedDpEvent(inner, int(steps))


# --------------------------------------------------------------------------- the ledger


def _flatten(event: DpEvent, count: int, out: list[tuple[DpEvent, int]]) -> None:
    if isinstance(event, dp_event.SelfComposedDpEvent):
        _flatten(event.event, count * event.count, out)
    elif isinstance(event, dp_event.ComposedDpEvent):
        for e in event.events:
            _flatten(e, count, out)
    elif count > 0:
        out.append((event, count))


Counts = tuple[tuple[str, int], ...]
"""A multiset of events: ``(repr(event), count)`` pairs sorted by repr."""

_RDP_CURVES: dict[tuple[str, str], np.ndarray] = {}
"""Each distinct event's RDP curve, by neighbouring relation (shared by all ledgers of a
process: a curve costs up to a second to compute, composing it is an addition)."""


class Ledger:
    """The DP events of one run and their ε at ``delta`` (see the module docstring).

    Besides the events themselves (``run_events``, ``client_events``) the ledger keeps
    their counts: the run-level events' and each client's, and how many clients share each
    history. ε is the worst over *distinct* client histories, so a round costs the same
    whether 10 or 10,000 clients took part with the same mechanism.
    """

    def __init__(self, accountant: AccountantKind, delta: float, relation: Relation) -> None:
        if not 0 < delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {delta}")
        self.accountant = accountant
        self.delta = delta
        self.relation = relation
        self.run_events: list[DpEvent] = []
        self.client_events: dict[int, list[DpEvent]] = {}
        self._events: dict[str, DpEvent] = {}
        self._leaves: dict[DpEvent, Counts] = {}
        self._run: dict[str, int] = {}
        self._history: dict[int, Counts] = {}
        self._histories: dict[Counts, int] = {}
        self._cache: dict[Counts, float] = {}

    def check(self, event: DpEvent) -> None:
        """ConfigError unless this ledger's accountant can compose ``event``."""
        if not make_accountant(self.accountant, self.relation).supports(event):
            raise ConfigError(
                f"the {self.accountant} accountant ({self.relation.name}) cannot account for "
                f"{event}"
            )

    def _counts_of(self, event: DpEvent) -> Counts:
        """``event`` as the multiset of the basic events it composes (memoized)."""
        try:
            found = self._leaves.get(event)
        except TypeError:  # an event holding a list is not hashable
            found, hashable = None, False
        else:
            hashable = True
        if found is not None:
            return found
        flat: list[tuple[DpEvent, int]] = []
        _flatten(event, 1, flat)
        merged: dict[str, int] = {}
        for leaf, count in flat:
            key = repr(leaf)
            self._events.setdefault(key, leaf)
            merged[key] = merged.get(key, 0) + count
        counts = tuple(sorted(merged.items()))
        if hashable and len(self._leaves) < 65536:
            self._leaves[event] = counts
        return counts

    @staticmethod
    def _merge(*parts: Mapping[str, int] | Counts) -> Counts:
        total: dict[str, int] = {}
        for part in parts:
            for key, count in part.items() if isinstance(part, Mapping) else part:
                total[key] = total.get(key, 0) + count
        return tuple(sorted(total.items()))

    def add_round(
        self, run_event: DpEvent | None = None, client_events: Mapping[int, DpEvent] | None = None
    ) -> None:
        """Add one round: its run-level event (if any) and each participating client's."""
        if run_event is not None:
            self.run_events.append(run_event)
            for key, count in self._counts_of(run_event):
                self._run[key] = self._run.get(key, 0) + count
        for cid, event in (client_events or {}).items():
            cid = int(cid)
            self.client_events.setdefault(cid, []).append(event)
            old = self._history.get(cid, ())
            new = self._merge(old, self._counts_of(event))
            self._history[cid] = new
            if old:
                left = self._histories[old] - 1
                if left:
                    self._histories[old] = left
                else:
                    del self._histories[old]
            self._histories[new] = self._histories.get(new, 0) + 1

    def epsilon(self) -> float:
        """ε at ``delta`` of everything added so far (0.0 before the first event)."""
        return self.epsilon_if()

    def epsilon_if(
        self,
        run_event: DpEvent | None = None,
        client_events: Mapping[int, DpEvent] | None = None,
        any_client: Sequence[DpEvent] = (),
    ) -> float:
        """ε if one more round with these events ran (all None: ε now).

        ``client_events`` go to the named clients; each of ``any_client`` is tried on every
        known client and on a client not seen yet (worst case over who takes part).
        """
        run = self._merge(self._run, () if run_event is None else self._counts_of(run_event))
        histories = set(self._histories)
        for cid, event in (client_events or {}).items():
            old = self._history.get(int(cid), ())
            histories.add(self._merge(old, self._counts_of(event)))
            if old and self._histories.get(old) == 1:
                histories.discard(old)  # its only client has moved on
        if not histories and not any_client:
            return self._compose_counts(run)
        worst = 0.0
        extras = [self._counts_of(event) for event in any_client]
        for history in histories:
            own = self._merge(run, history)
            worst = max(worst, self._compose_counts(own))
            for extra in extras:
                worst = max(worst, self._compose_counts(self._merge(own, extra)))
        for extra in extras:
            worst = max(worst, self._compose_counts(self._merge(run, extra)))
        return worst

    def client_epsilons(self) -> dict[int, float]:
        """Each client's own ε (the run-level events included)."""
        return {
            cid: self._compose_counts(self._merge(self._run, history))
            for cid, history in sorted(self._history.items())
        }

    def compose(self, events: Sequence[DpEvent]) -> float:
        """ε at ``delta`` of ``events`` composed by this ledger's accountant (cached)."""
        return self._compose_counts(self._merge(*(self._counts_of(e) for e in events)))

    def _compose_counts(self, counts: Counts) -> float:
        cached = self._cache.get(counts)
        if cached is not None:
            return cached
        groups = [(self._events[key], count) for key, count in counts if count > 0]
        if not groups:
            return 0.0
        if self.accountant == "rdp":
            value = self._rdp_epsilon(groups)
        else:
            accountant = make_accountant(self.accountant, self.relation)
            for event, count in groups:
                self._compose(accountant, event, count)
            value = float(accountant.get_epsilon(self.delta))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[counts] = value
        return value

    def _compose(self, accountant: Any, event: DpEvent, count: int) -> None:
        try:
            accountant.compose(event, count)
        except dp_accounting.UnsupportedEventError as exc:
            raise ConfigError(
                f"the {self.accountant} accountant cannot account for {event}"
            ) from exc

    def _rdp_epsilon(self, groups: Sequence[tuple[DpEvent, int]]) -> float:
        """RDP composes by adding each event's RDP curve ``count`` times: each distinct
        event's curve is computed once (the same numbers as ``RdpAccountant.compose``),
        and ε comes from dp-accounting's own conversion."""
        total: np.ndarray | None = None
        orders: np.ndarray | None = None
        for event, count in groups:
            key = (self.relation.name, repr(event))
            curve = _RDP_CURVES.get(key)
            if curve is None:
                accountant = RdpAccountant(neighboring_relation=self.relation)
                self._compose(accountant, event, 1)
                curve = accountant.rdp
                if len(_RDP_CURVES) > 4096:
                    _RDP_CURVES.clear()
                _RDP_CURVES[key] = curve
            orders = RdpAccountant(neighboring_relation=self.relation).orders
            total = count * curve if total is None else total + count * curve
        assert total is not None and orders is not None
        return float(compute_epsilon(orders, total, self.delta)[0])


# --------------------------------------------------------------------------- JSON

_EVENT_TYPES: dict[str, type[DpEvent]] = {
    name: cls
    for name, cls in vars(dp_event).items()
    if isinstance(cls, type) and issubclass(cls, DpEvent) and cls is not DpEvent
}


def event_to_json(event: DpEvent) -> dict[str, Any]:
    """``event`` as JSON-compatible values: ``{"type": class name, field: value, ...}``."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for name, value in attr.asdict(event, recurse=False).items():
        out[name] = _value_to_json(value)
    return out


def _value_to_json(value: Any) -> Any:
    if isinstance(value, DpEvent):
        return event_to_json(value)
    if isinstance(value, list | tuple):
        return [_value_to_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SerializationError(f"a DP event field of type {type(value).__name__} cannot be stored")


def event_from_json(data: Mapping[str, Any]) -> DpEvent:
    """The event :func:`event_to_json` wrote; only dp-accounting's own event classes."""
    if not isinstance(data, Mapping):
        raise SerializationError(f"a stored DP event must be an object, got {data!r}")
    cls = _EVENT_TYPES.get(str(data.get("type")))
    if cls is None:
        raise SerializationError(f"unknown DP event type {data.get('type')!r}")
    fields = {k: _value_from_json(v) for k, v in data.items() if k != "type"}
    try:
        event: DpEvent = cls(**fields)
    except TypeError as exc:
        raise SerializationError(f"bad stored DP event {data!r}: {exc}") from exc
    return event


def _value_from_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return event_from_json(value)
    if isinstance(value, list):
        return [_value_from_json(v) for v in value]
    return value


__all__ = [
    "CLIP",
    "EPSILON",
    "NOISE_MULTIPLIER",
    "SAMPLE_RATE",
    "STEPS",
    "DpEvent",
    "Ledger",
    "Relation",
    "client_event",
    "event_from_json",
    "event_to_json",
    "make_accountant",
    "relation_for",
    "round_event",
]
