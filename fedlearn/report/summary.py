"""Per-client evaluation summaries of a recorded run.

A run's aggregate metric hides the clients it serves badly, so the report keeps the
per-client view: for every round and every numeric evaluation metric it gives the
``num_examples``-weighted mean over the clients that evaluated, the worst client (its
id and value), and the 10th/50th/90th percentiles over clients. It also lists every
client failure (round, stage, client, error) and every failed round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.drift.report import DriftReport, drift_report
from fedlearn.engine.messages import Stage
from fedlearn.engine.records import Scalar
from fedlearn.engine.results import ClientRecord
from fedlearn.engine.store import ConfigChange, RunEvent, RunStore

#: Metric names for which a lower value is better (the worst client has the maximum).
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss"})
#: Name endings that also mean "lower is better" (``val_loss``, ``calibration_error``).
_LOWER_SUFFIXES = ("loss", "error")
#: Metrics every report has columns for, in this order, before any user metric.
CORE_METRICS: tuple[str, ...] = ("loss", "accuracy")
PERCENTILES: tuple[float, float, float] = (10.0, 50.0, 90.0)

_STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}


def lower_is_better(name: str) -> bool:
    """Whether a lower value of metric ``name`` is better (``loss``, ``*loss``, ``*error``)."""
    lowered = name.lower()
    return lowered in LOWER_IS_BETTER or lowered.endswith(_LOWER_SUFFIXES)


@dataclass(frozen=True)
class MetricSummary:
    """One evaluation metric of one round, over the clients that reported a finite value.

    ``worst`` is the maximum for lower-is-better metrics and the minimum otherwise; on a
    tie the client with the smallest id is named. ``nonfinite_clients`` lists clients
    whose value was NaN or infinite; they are left out of every number here.
    """

    name: str
    lower_is_better: bool
    clients: int
    num_examples: int
    mean: float
    worst: float
    worst_client: int
    p10: float
    p50: float
    p90: float
    nonfinite_clients: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoundSummary:
    """What happened in one round: stage counts, status and per-metric client statistics.

    ``metrics`` maps a metric name to its summary over the round's successful evaluation
    replies (absent when no client reported it); ``train_metrics`` and ``eval_metrics``
    are the strategy's own aggregates as recorded in the round row.
    """

    round: int
    ok: bool
    error: str | None
    duration_s: float
    train_selected: int
    train_ok: int
    train_failed: int
    eval_selected: int
    eval_ok: int
    eval_failed: int
    metrics: Mapping[str, MetricSummary]
    train_metrics: Mapping[str, Scalar]
    eval_metrics: Mapping[str, Scalar]
    epsilon: float | None = None
    """The run's differential-privacy ε (at the report's ``delta``) after this round;
    None without DP."""
    virtual_time: float | None = None
    """Simulated time at the end of the round's training (a latency model, an
    asynchronous strategy's aggregation); None without one."""

    def metric(self, name: str) -> MetricSummary | None:
        """The summary of metric ``name`` in this round, if any client reported it."""
        return self.metrics.get(name)


@dataclass(frozen=True)
class ClientFailure:
    """A client that failed a task, and why."""

    round: int
    stage: Stage
    client_id: int
    error: str


@dataclass(frozen=True)
class Report:
    """A run's per-round, per-client evaluation summary.

    ``clients`` holds every client row (training and evaluation) in round, stage
    (train, then evaluate) and client order; ``metric_names`` are the evaluation
    metrics summarized (``loss`` and ``accuracy`` first, then user metrics by name).
    """

    run_id: str
    status: str
    seed: int | None
    created: float | None
    config: Mapping[str, Any]
    metric_names: tuple[str, ...]
    rounds: tuple[RoundSummary, ...]
    failures: tuple[ClientFailure, ...]
    clients: tuple[ClientRecord, ...] = field(repr=False)
    history: tuple[RunEvent, ...] = ()
    """Starts, resumes, interruptions and ends, oldest first."""
    config_changes: tuple[ConfigChange, ...] = ()
    """Operational config changes made when the run resumed, with their first round."""
    delta: float | None = None
    """The δ at which each round's ``epsilon`` holds (None without DP)."""
    drift: DriftReport | None = None
    """Drift scores of the clients' data summaries and what they flag (None without
    drift monitoring)."""

    @property
    def epsilon(self) -> float | None:
        """The run's ε after its last accounted round (None without DP)."""
        values = [r.epsilon for r in self.rounds if r.epsilon is not None]
        return values[-1] if values else None

    @property
    def failed_rounds(self) -> tuple[int, ...]:
        """The rounds whose update was not applied."""
        return tuple(r.round for r in self.rounds if not r.ok)

    @property
    def ok(self) -> bool:
        """Whether the run finished with every round applied (client failures allowed)."""
        return self.status == "finished" and not self.failed_rounds


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`write_report` wrote, and the report they hold.

    The PNG paths are ``None`` when the plots were skipped (no matplotlib: the ``report``
    extra); ``notes`` then says so."""

    report: Report = field(repr=False)
    report_json: Path
    clients_csv: Path
    rounds_csv: Path
    metrics_png: Path | None
    clients_png: Path | None
    notes: tuple[str, ...] = ()
    privacy_png: Path | None = None
    """ε per round (differential privacy only)."""


# --------------------------------------------------------------------------- summary


def evaluation_values(record: ClientRecord) -> dict[str, float]:
    """The numeric evaluation values of one client row: ``loss`` plus numeric metrics.

    ``record.loss`` wins over a metric called ``loss``; booleans and strings are skipped.
    """
    values = {
        name: float(value)
        for name, value in record.metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    if record.loss is not None:
        values["loss"] = float(record.loss)
    return values


def summarize(store: RunStore) -> Report:
    """Summarize the run recorded in ``store``: per-round client statistics and failures.

    A run still in progress gives the rounds committed so far.
    """
    info = store.run_info()
    # Rounds first: client rows of a round committed after this read are left out.
    round_records = store.rounds()
    known = {r.round for r in round_records}
    clients = tuple(sorted((c for c in store.clients() if c.round in known), key=_client_order))
    evaluated: dict[int, list[ClientRecord]] = {}
    for record in clients:
        if record.stage is Stage.EVALUATE and record.ok:
            evaluated.setdefault(record.round, []).append(record)
    names = _metric_names(r for rows in evaluated.values() for r in rows)
    privacy = {row.round: row for row in store.privacy_rows()}
    rounds = tuple(
        RoundSummary(
            round=r.round,
            ok=r.ok,
            error=r.error,
            duration_s=r.duration_s,
            train_selected=r.train_selected,
            train_ok=r.train_ok,
            train_failed=max(r.train_selected - r.train_ok, 0),
            eval_selected=r.eval_selected,
            eval_ok=r.eval_ok,
            eval_failed=max(r.eval_selected - r.eval_ok, 0),
            metrics=_round_metrics(evaluated.get(r.round, []), names),
            train_metrics=dict(r.train_metrics),
            eval_metrics=dict(r.eval_metrics),
            epsilon=privacy[r.round].epsilon if r.round in privacy else None,
            virtual_time=r.virtual_time,
        )
        for r in round_records
    )
    failures = tuple(
        ClientFailure(c.round, c.stage, c.client_id, c.error or "unknown error")
        for c in clients
        if not c.ok
    )
    seed = info.get("seed")
    created = info.get("created")
    return Report(
        run_id=store.run_id,
        status=str(info.get("status", "unknown")),
        seed=int(seed) if seed is not None else None,
        created=float(created) if created is not None else None,
        config=dict(info.get("config", {})),
        metric_names=names,
        rounds=rounds,
        failures=failures,
        clients=clients,
        history=tuple(store.events()),
        config_changes=tuple(store.config_changes()),
        delta=next((row.delta for row in privacy.values()), None),
        drift=drift_report(
            {r: sites for r, sites in store.data_stats().items() if r in known},
            dict(info.get("config", {})),
        ),
    )


def _client_order(record: ClientRecord) -> tuple[int, int, int]:
    return record.round, _STAGE_ORDER[record.stage], record.client_id


def _metric_names(records: Iterable[ClientRecord]) -> tuple[str, ...]:
    found: set[str] = set()
    for record in records:
        found.update(evaluation_values(record))
    return CORE_METRICS + tuple(sorted(found - set(CORE_METRICS)))


def _round_metrics(
    records: Sequence[ClientRecord], names: Sequence[str]
) -> dict[str, MetricSummary]:
    columns: dict[str, list[tuple[int, int, float]]] = {}
    for record in records:
        for name, value in evaluation_values(record).items():
            columns.setdefault(name, []).append((record.client_id, record.num_examples, value))
    out: dict[str, MetricSummary] = {}
    for name in names:
        summary = metric_summary(name, columns.get(name, []))
        if summary is not None:
            out[name] = summary
    return out


def metric_summary(name: str, rows: Sequence[tuple[int, int, float]]) -> MetricSummary | None:
    """Summarize ``(client_id, num_examples, value)`` rows of one metric (None if no
    value is finite)."""
    finite = [row for row in rows if math.isfinite(row[2])]
    nonfinite = tuple(cid for cid, _, value in rows if not math.isfinite(value))
    if not finite:
        return None
    ids = [cid for cid, _, _ in finite]
    weights = np.array([max(n, 0) for _, n, _ in finite], dtype=np.float64)
    values = np.array([v for _, _, v in finite], dtype=np.float64)
    total = float(weights.sum())
    mean = float(weights @ values / total) if total > 0 else float(values.mean())
    lower = lower_is_better(name)
    worst = int(np.argmax(values)) if lower else int(np.argmin(values))
    p10, p50, p90 = (float(p) for p in np.percentile(values, PERCENTILES))
    return MetricSummary(
        name=name,
        lower_is_better=lower,
        clients=len(finite),
        num_examples=int(total),
        mean=mean,
        worst=float(values[worst]),
        worst_client=ids[worst],
        p10=p10,
        p50=p50,
        p90=p90,
        nonfinite_clients=nonfinite,
    )
