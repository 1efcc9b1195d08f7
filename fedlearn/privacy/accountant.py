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

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
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
    sigma = _number(metrics, NOISE_MULTIPLIER)
    if sigma is None or not math.isfinite(sigma) or sigma <= 0:
        return dp_event.NonPrivateDpEvent()
    rate, steps = _number(metrics, SAMPLE_RATE), _number(metrics, STEPS)
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


def grouped(events: Iterable[DpEvent]) -> list[tuple[DpEvent, int]]:
    """Equal events together with their total count, in order of first appearance."""
    flat: list[tuple[DpEvent, int]] = []
    for event in events:
        _flatten(event, 1, flat)
    groups: dict[str, tuple[DpEvent, int]] = {}
    for event, count in flat:
        key = repr(event)
        seen = groups.get(key)
        groups[key] = (event, count + (seen[1] if seen else 0))
    return list(groups.values())


_RDP_CURVES: dict[tuple[str, str], np.ndarray] = {}
"""Each distinct event's RDP curve, by neighbouring relation (shared by all ledgers of a
process: a curve costs up to a second to compute, composing it is an addition)."""


class Ledger:
    """The DP events of one run and their ε at ``delta`` (see the module docstring)."""

    def __init__(self, accountant: AccountantKind, delta: float, relation: Relation) -> None:
        if not 0 < delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {delta}")
        self.accountant = accountant
        self.delta = delta
        self.relation = relation
        self.run_events: list[DpEvent] = []
        self.client_events: dict[int, list[DpEvent]] = {}
        self._cache: dict[tuple[tuple[str, int], ...], float] = {}

    def check(self, event: DpEvent) -> None:
        """ConfigError unless this ledger's accountant can compose ``event``."""
        if not make_accountant(self.accountant, self.relation).supports(event):
            raise ConfigError(
                f"the {self.accountant} accountant ({self.relation.name}) cannot account for "
                f"{event}"
            )

    def add_round(
        self, run_event: DpEvent | None = None, client_events: Mapping[int, DpEvent] | None = None
    ) -> None:
        """Add one round: its run-level event (if any) and each participating client's."""
        if run_event is not None:
            self.run_events.append(run_event)
        for cid, event in (client_events or {}).items():
            self.client_events.setdefault(int(cid), []).append(event)

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
        run = [*self.run_events, *([run_event] if run_event is not None else [])]
        extra = dict(client_events or {})
        clients = sorted(self.client_events.keys() | extra.keys())
        if not clients and not any_client:
            return self.compose(run)
        worst = 0.0
        for cid in clients:
            own = [*run, *self.client_events.get(cid, []), *([extra[cid]] if cid in extra else [])]
            worst = max(worst, self.compose(own))
            for event in any_client:
                worst = max(worst, self.compose([*own, event]))
        for event in any_client:
            worst = max(worst, self.compose([*run, event]))
        return worst

    def client_epsilons(self) -> dict[int, float]:
        """Each client's own ε (the run-level events included)."""
        return {
            cid: self.compose([*self.run_events, *events])
            for cid, events in sorted(self.client_events.items())
        }

    def compose(self, events: Sequence[DpEvent]) -> float:
        """ε at ``delta`` of ``events`` composed by this ledger's accountant (cached)."""
        groups = grouped(events)
        key = tuple((repr(e), n) for e, n in groups)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
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
        self._cache[key] = value
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
    "grouped",
    "make_accountant",
    "relation_for",
    "round_event",
]
