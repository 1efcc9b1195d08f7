"""A report's files: ``report.json``, ``clients.csv``, ``rounds.csv`` and the plots."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedlearn.drift.report import site_name
from fedlearn.engine.messages import Stage
from fedlearn.engine.store import RunStore
from fedlearn.report import plot_process
from fedlearn.report.atomic import write_atomic
from fedlearn.report.plots import (
    PLOTS_SKIPPED,
    can_plot,
    write_plots,
)
from fedlearn.report.summary import Report, ReportFiles, lower_is_better, summarize

log = logging.getLogger(__name__)

# Column names of clients.csv that are not metrics; a metric of the same name gets a prefix.
_CLIENT_COLUMNS = ("round", "stage", "client_id", "ok", "num_examples", "loss")
_CLIENT_TAIL = ("error",)


def write_report(store: RunStore, out_dir: Path) -> ReportFiles:
    """Summarize ``store`` and write the report files into ``out_dir`` (created if missing).

    Writes ``report.json`` (the summary, failures and every client row; NaN and infinite
    values become ``null``), ``clients.csv`` (one row per round, stage and client),
    ``rounds.csv`` (one row per round, with ``epsilon`` under differential privacy),
    ``metrics_per_round.png``, ``clients_per_round.png`` and, under differential privacy,
    ``privacy_per_round.png`` (ε after each round). Each file is written to a temporary
    name and renamed.

    Without matplotlib (the ``report`` extra) the two plots are skipped: their paths are
    ``None``, ``notes`` says so, and it is logged once per call.
    """
    report = summarize(store)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = can_plot()
    files = ReportFiles(
        report=report,
        report_json=out_dir / "report.json",
        clients_csv=out_dir / "clients.csv",
        rounds_csv=out_dir / "rounds.csv",
        metrics_png=out_dir / "metrics_per_round.png" if plots else None,
        clients_png=out_dir / "clients_per_round.png" if plots else None,
        notes=() if plots else (PLOTS_SKIPPED,),
        privacy_png=(
            out_dir / "privacy_per_round.png" if plots and report.epsilon is not None else None
        ),
    )
    pngs = {
        name: path
        for name, path in (
            ("metrics", files.metrics_png),
            ("clients", files.clients_png),
            ("privacy", files.privacy_png),
        )
        if path is not None
    }
    # A plot process (fedlearn simulate's) draws them while the JSON and CSV are written.
    background = plot_process.active() if pngs else None
    drawing = background is not None and background.request(store.path, store.run_id, pngs)
    write_atomic(files.report_json, _report_json(report).encode())
    write_atomic(files.clients_csv, _csv_bytes(*_client_table(report)))
    write_atomic(files.rounds_csv, _csv_bytes(*_round_table(report)))
    if pngs and not (drawing and background is not None and background.wait()):
        write_plots(report, pngs)
    if not pngs:
        log.warning("%s: %s", out_dir, PLOTS_SKIPPED)
    return files


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stage):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _report_json(report: Report) -> str:
    body = asdict(report)
    keys = ("run_id", "status", "seed", "created", "config", "history", "config_changes")
    run = {key: body.pop(key) for key in keys}
    document = {
        "run": run,
        "ok": report.ok,
        "failed_rounds": list(report.failed_rounds),
        "epsilon": report.epsilon,
        "drift_flagged": (
            None
            if report.drift is None
            else [{"round": f.round, "site": site_name(f.site)} for f in report.drift.flagged]
        ),
        "lower_is_better": [name for name in report.metric_names if lower_is_better(name)],
        **body,
    }
    return json.dumps(_jsonable(document), indent=2, allow_nan=False) + "\n"


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Stage):
        return value.value
    return str(value)


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_csv_cell(v) for v in row] for row in rows)
    return buffer.getvalue().encode()


def _client_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    names = sorted({name for record in report.clients for name in record.metrics})
    reserved = set(_CLIENT_COLUMNS) | set(_CLIENT_TAIL)
    drift = report.drift
    header = [
        *_CLIENT_COLUMNS,
        *(f"metric:{n}" if n in reserved else n for n in names),
        *(_DRIFT_CLIENT_COLUMNS if drift is not None else ()),
        *_CLIENT_TAIL,
    ]
    rows = []
    for c in report.clients:
        row = [
            c.round,
            c.stage,
            c.client_id,
            c.ok,
            c.num_examples,
            c.loss,
            *(c.metrics.get(name) for name in names),
        ]
        if drift is not None:
            score = drift.score(c.round, c.client_id) if c.stage is Stage.TRAIN else None
            row.extend(
                (None,) * 4
                if score is None
                else (score.psi, score.label_psi, score.mean_shift, score.flagged)
            )
        rows.append([*row, c.error])
    return header, rows


_DRIFT_CLIENT_COLUMNS = ("drift_psi", "drift_label_psi", "drift_mean_shift", "drift_flagged")


_METRIC_FIELDS = ("mean", "worst", "worst_client", "p10", "p50", "p90", "clients")


def _round_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    header = [
        "round",
        "ok",
        "error",
        "duration_s",
        "train_selected",
        "train_ok",
        "train_failed",
        "eval_selected",
        "eval_ok",
        "eval_failed",
        *(f"{name}_{f}" for name in report.metric_names for f in _METRIC_FIELDS),
    ]
    private = report.epsilon is not None
    if private:
        header.append("epsilon")
    clocked = any(r.virtual_time is not None for r in report.rounds)
    if clocked:
        header.append("virtual_time")
    drift = report.drift
    if drift is not None:
        header.extend(("drift_psi_max", "drift_flagged"))
    rows: list[list[Any]] = []
    for r in report.rounds:
        row: list[Any] = [
            r.round,
            r.ok,
            r.error,
            r.duration_s,
            r.train_selected,
            r.train_ok,
            r.train_failed,
            r.eval_selected,
            r.eval_ok,
            r.eval_failed,
        ]
        for name in report.metric_names:
            summary = r.metric(name)
            row.extend(getattr(summary, f) if summary is not None else None for f in _METRIC_FIELDS)
        if private:
            row.append(r.epsilon)
        if clocked:
            row.append(r.virtual_time)
        if drift is not None:
            scores = [s for s in drift.scores if s.round == r.round]
            row.append(max((s.psi for s in scores), default=None))
            row.append(" ".join(site_name(site) for site in drift.flagged_in(r.round)))
        rows.append(row)
    return header, rows
