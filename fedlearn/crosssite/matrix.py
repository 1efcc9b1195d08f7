"""A cross-site matrix: every evaluated model (rows) on every site (columns), every metric.

The cells are :class:`~fedlearn.engine.store.SiteEvaluation` rows of an evaluate-only run
(its run store holds them); this module reads them back, summarizes each model over the
sites (mean, weighted mean, worst and best site, spread), takes per-site deltas against a
baseline model, and writes the CSV and JSON exports. Nothing here evaluates anything.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlearn.engine.store import SiteEvaluation
from fedlearn.errors import ConfigError
from fedlearn.report.summary import lower_is_better

#: How a site's own locally trained model is labelled: ``local <client id>``.
LOCAL_PREFIX = "local "


@dataclass(frozen=True)
class Entry:
    """One evaluated model: a registry version, or one site's own local model."""

    label: str
    """``<name> v<version>`` or ``local <client id>``: the matrix row's name."""
    model: str | None = None
    version: int | None = None
    aliases: tuple[str, ...] = ()
    local_site: int | None = None
    """The client whose own data alone trained this model (None: a registry version)."""


@dataclass(frozen=True)
class EntrySummary:
    """One model's ``metric`` over the sites that reported a finite value."""

    entry: str
    metric: str
    lower_is_better: bool
    sites: int
    mean: float
    weighted_mean: float
    worst: float
    worst_site: str
    best: float
    best_site: str
    spread: float
    """``|best - worst|``: how unevenly the model does across sites."""
    failed_sites: tuple[str, ...] = ()


@dataclass
class SiteMatrix:
    """The cells of one cross-site evaluation, with the models and sites they cover."""

    evaluation: str
    entries: list[Entry]
    sites: dict[int, str]
    """client id -> site name, in column order."""
    cells: list[SiteEvaluation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {(c.entry, c.client_id): c for c in self.cells}

    def add(self, cells: Sequence[SiteEvaluation]) -> None:
        """Add cells (one model's row, as it is evaluated)."""
        for c in cells:
            self.cells.append(c)
            self._index[(c.entry, c.client_id)] = c

    def entry(self, label: str) -> Entry:
        """The entry called ``label`` (ConfigError when there is none)."""
        for e in self.entries:
            if e.label == label:
                return e
        raise ConfigError(
            f"no model {label!r} in cross-site evaluation {self.evaluation} "
            f"(models: {', '.join(e.label for e in self.entries)})"
        )

    def cell(self, label: str, client_id: int) -> SiteEvaluation | None:
        """The cell of model ``label`` at client ``client_id`` (None: not evaluated)."""
        return self._index.get((label, client_id))

    def value(self, label: str, client_id: int, metric: str) -> float | None:
        """A cell's value of ``metric`` (``loss`` included); None when the site failed or
        did not report it."""
        cell = self.cell(label, client_id)
        return None if cell is None or not cell.ok else cell_values(cell).get(metric)

    def metrics(self) -> list[str]:
        """Every metric some successful cell reported: ``accuracy`` and ``loss`` first."""
        names = {n for c in self.cells if c.ok for n in cell_values(c)}
        first = [n for n in ("accuracy", "loss") if n in names]
        return first + sorted(names - set(first))

    def summaries(self) -> list[EntrySummary]:
        """Each model's summary for each metric, in entry then metric order."""
        out = []
        for entry in self.entries:
            for metric in self.metrics():
                summary = self.summary(entry.label, metric)
                if summary is not None:
                    out.append(summary)
        return out

    def summary(self, label: str, metric: str) -> EntrySummary | None:
        """Model ``label``'s ``metric`` over the sites (None: no site reported it)."""
        rows: list[tuple[str, int, float]] = []
        failed: list[str] = []
        for cid, site in self.sites.items():
            cell = self.cell(label, cid)
            if cell is None or not cell.ok:
                failed.append(site)
                continue
            value = cell_values(cell).get(metric)
            if value is not None and math.isfinite(value):
                rows.append((site, cell.num_examples, value))
        if not rows:
            return None
        lower = lower_is_better(metric)
        values = [v for _, _, v in rows]
        total = sum(max(n, 0) for _, n, _ in rows)
        weighted = (
            sum(max(n, 0) * v for _, n, v in rows) / total if total else sum(values) / len(values)
        )
        # on a tie the first site (column order) is named
        low = min(range(len(rows)), key=lambda i: (values[i], i))
        high = min(range(len(rows)), key=lambda i: (-values[i], i))
        worst, best = (high, low) if lower else (low, high)
        return EntrySummary(
            entry=label,
            metric=metric,
            lower_is_better=lower,
            sites=len(rows),
            mean=sum(values) / len(values),
            weighted_mean=weighted,
            worst=values[worst],
            worst_site=rows[worst][0],
            best=values[best],
            best_site=rows[best][0],
            spread=abs(values[best] - values[worst]),
            failed_sites=tuple(failed),
        )

    def deltas(self, baseline: str, metric: str) -> dict[str, dict[str, float]]:
        """Per model (other than ``baseline``), per site: its ``metric`` minus the
        baseline's at that site (sites where either has no value are left out)."""
        self.entry(baseline)
        out: dict[str, dict[str, float]] = {}
        for entry in self.entries:
            if entry.label == baseline:
                continue
            row: dict[str, float] = {}
            for cid, site in self.sites.items():
                mine, base = self.value(entry.label, cid, metric), self.value(baseline, cid, metric)
                if mine is not None and base is not None:
                    row[site] = mine - base
            out[entry.label] = row
        return out

    def default_baseline(self) -> str:
        """The model other versions are compared with: the one that is ``production``,
        else the first registry version, else the first entry."""
        for entry in self.entries:
            if "production" in entry.aliases:
                return entry.label
        versions = [e for e in self.entries if e.local_site is None]
        return (versions or self.entries)[0].label

    # -- exports -----------------------------------------------------------------------

    def to_json(self, baseline: str | None = None) -> dict[str, Any]:
        """Everything: models, sites, cells, the matrix per metric, summaries, deltas."""
        base = baseline or (self.default_baseline() if self.entries else None)
        metrics = self.metrics()
        return {
            "evaluation": self.evaluation,
            "entries": [{**asdict(e), "aliases": list(e.aliases)} for e in self.entries],
            "sites": [{"client_id": cid, "site": site} for cid, site in self.sites.items()],
            "metrics": metrics,
            "matrix": {
                metric: {
                    e.label: {
                        site: _finite_or_none(self.value(e.label, cid, metric))
                        for cid, site in self.sites.items()
                    }
                    for e in self.entries
                }
                for metric in metrics
            },
            "cells": [
                {
                    "entry": c.entry,
                    "client_id": c.client_id,
                    "site": c.site,
                    "ok": c.ok,
                    "num_examples": c.num_examples,
                    "loss": _finite_or_none(c.loss),
                    "metrics": {k: _jsonable(v) for k, v in c.metrics.items()},
                    "error": c.error,
                }
                for c in self.cells
            ],
            "summary": [
                {
                    **{k: _jsonable(v) for k, v in asdict(s).items()},
                    "failed_sites": list(s.failed_sites),
                }
                for s in self.summaries()
            ],
            "baseline": base,
            "deltas": {}
            if base is None
            else {metric: self.deltas(base, metric) for metric in metrics},
        }

    def matrix_csv(self) -> str:
        """One row per (model, site): its identity, the cell's outcome, every metric."""
        metrics = self.metrics()
        header = ["entry", "model", "version", "client_id", "site", "ok", "num_examples"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*header, *metrics, "error"])
        entries = {e.label: e for e in self.entries}
        for c in self.cells:
            e = entries.get(c.entry, Entry(c.entry))
            values = cell_values(c) if c.ok else {}
            writer.writerow(
                [
                    c.entry,
                    e.model or "",
                    "" if e.version is None else e.version,
                    c.client_id,
                    c.site,
                    int(c.ok),
                    c.num_examples,
                    *(_csv_number(values.get(m)) for m in metrics),
                    c.error or "",
                ]
            )
        return buffer.getvalue()

    def summary_csv(self) -> str:
        """One row per (model, metric): the summary over sites."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            [
                "entry",
                "metric",
                "sites",
                "mean",
                "weighted_mean",
                "worst",
                "worst_site",
                "best",
                "best_site",
                "spread",
                "failed_sites",
            ]
        )
        for s in self.summaries():
            writer.writerow(
                [
                    s.entry,
                    s.metric,
                    s.sites,
                    _csv_number(s.mean),
                    _csv_number(s.weighted_mean),
                    _csv_number(s.worst),
                    s.worst_site,
                    _csv_number(s.best),
                    s.best_site,
                    _csv_number(s.spread),
                    " ".join(s.failed_sites),
                ]
            )
        return buffer.getvalue()


def cell_values(cell: SiteEvaluation) -> dict[str, float]:
    """A cell's numeric values: its metrics and ``loss`` (the loss wins over a metric of
    that name; booleans and text are left out)."""
    values = {
        k: float(v)
        for k, v in cell.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if cell.loss is not None:
        values["loss"] = float(cell.loss)
    return values


def entries_json(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """Entries as the evaluate-only run's config stores them."""
    return [{**asdict(e), "aliases": list(e.aliases)} for e in entries]


def entries_from_json(raw: Sequence[dict[str, Any]]) -> list[Entry]:
    """The inverse of :func:`entries_json`."""
    return [
        Entry(
            str(r["label"]),
            r.get("model"),
            r.get("version"),
            tuple(r.get("aliases", ())),
            r.get("local_site"),
        )
        for r in raw
    ]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_number(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def dumps(data: dict[str, Any]) -> str:
    """JSON text of :meth:`SiteMatrix.to_json` (strict JSON: no NaN)."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def read_matrix(path: str | Path, evaluation: str | None = None) -> SiteMatrix:
    """The matrix of ``evaluation`` (default: the newest) from an evaluations' run store
    (``<out>/run.db`` of ``fedlearn evaluate-sites``)."""
    from fedlearn.engine.store import RunStore

    store = RunStore(path, read_only=True)
    try:
        ids = store.run_ids()
        if not ids or (evaluation is not None and evaluation not in ids):
            raise ConfigError(f"{path} holds no cross-site evaluation {evaluation or ''}".strip())
        store.run_id = evaluation or ids[-1]
        config = store.run_info()["config"]
        if config.get("kind") != "cross-site evaluation":
            raise ConfigError(f"{path}: run {store.run_id!r} is not a cross-site evaluation")
        sites = {int(s["client_id"]): str(s["site"]) for s in config["sites"]}
        return SiteMatrix(
            store.run_id, entries_from_json(config["entries"]), sites, store.site_evaluations()
        )
    finally:
        store.close()
