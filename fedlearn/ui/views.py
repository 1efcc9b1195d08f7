"""What the live page shows of a run, as plain JSON values: built from the run store (a
page opened mid-run, a finished run) and from a round's own records as it ends."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord
from fedlearn.engine.store import RunStore
from fedlearn.report.summary import CORE_METRICS, evaluation_values, metric_summary
from fedlearn.ui.events import client_json, finite, round_json


def round_view(
    round: dict[str, Any], evaluations: Iterable[ClientRecord], epsilon: float | None = None
) -> dict[str, Any]:
    """A round row (:func:`~fedlearn.ui.events.round_json`) with, per evaluation metric,
    the weighted mean, the worst client and the p10/p50/p90 over clients (the report's
    numbers), and one dot per client that evaluated."""
    dots: list[dict[str, Any]] = []
    columns: dict[str, list[tuple[int, int, float]]] = {}
    for record in evaluations:
        if not record.ok or record.stage is not Stage.EVALUATE:
            continue
        values = evaluation_values(record)
        dots.append(
            {
                "client": record.client_id,
                "num_examples": record.num_examples,
                "values": {k: finite(v) for k, v in values.items()},
            }
        )
        for name, value in values.items():
            columns.setdefault(name, []).append((record.client_id, record.num_examples, value))
    names = [*CORE_METRICS, *sorted(set(columns) - set(CORE_METRICS))]
    metrics: dict[str, Any] = {}
    for name in names:
        summary = metric_summary(name, columns.get(name, []))
        if summary is not None:
            metrics[name] = {
                "mean": summary.mean,
                "worst": summary.worst,
                "worst_client": summary.worst_client,
                "p10": summary.p10,
                "p50": summary.p50,
                "p90": summary.p90,
                "clients": summary.clients,
                "lower_is_better": summary.lower_is_better,
            }
    return {**round, "epsilon": epsilon, "metrics": metrics, "dots": dots}


def failure_json(record: ClientRecord) -> dict[str, Any]:
    """A failed client task: round, stage, client, why."""
    return {
        "round": record.round,
        "stage": record.stage.value,
        "client": record.client_id,
        "error": record.error or "unknown error",
    }


def store_view(path: Path, run_id: str | None) -> dict[str, Any]:
    """Everything a run store holds that the page shows: the run, its rounds (with
    per-client statistics), client failures, ε and published versions. An empty view
    when the store does not exist yet."""
    empty: dict[str, Any] = {
        "run": {},
        "rounds": [],
        "failures": [],
        "publications": [],
        "clients": [],
        "delta": None,
    }
    if not path.is_file():
        return empty
    store = RunStore(path, read_only=True)
    try:
        ids = store.run_ids()
        if not ids:
            return empty
        store.run_id = run_id if run_id in ids else ids[-1]
        info = store.run_info()
        # rounds first: client rows of a round committed after this read are left out
        rounds = store.rounds()
        known = {r.round for r in rounds}
        records = [c for c in store.clients() if c.round in known]
        privacy = {row.round: row for row in store.privacy_rows()}
        publications = store.publications()
        events = store.events()
    finally:
        store.close()
    by_round: dict[int, list[ClientRecord]] = {}
    for record in records:
        by_round.setdefault(record.round, []).append(record)
    config = info.get("config", {})
    run = config.get("run", {}) if isinstance(config, dict) else {}
    ended = [e.at for e in events if e.kind in {"finished", "failed", "interrupted"}]
    return {
        "run": {
            "run_id": store.run_id,
            "status": info.get("status"),
            "rounds": run.get("rounds"),
            "created": info.get("created"),
            "ended": ended[-1] if ended and info.get("status") != "running" else None,
        },
        "rounds": [
            round_view(
                round_json(r),
                by_round.get(r.round, []),
                privacy[r.round].epsilon if r.round in privacy else None,
            )
            for r in rounds
        ],
        "failures": [failure_json(c) for c in records if not c.ok],
        "publications": [
            {
                "round": p.round,
                "model": p.model,
                "version": p.version,
                "promoted": p.promoted,
                "reason": p.reason,
            }
            for p in publications
        ],
        "clients": clients_seen(records),
        "delta": next((row.delta for row in privacy.values()), None),
    }


def clients_seen(records: Sequence[ClientRecord]) -> list[dict[str, Any]]:
    """Each client that has a recorded result: its last round and stage."""
    order = {stage: i for i, stage in enumerate(Stage)}
    last: dict[int, ClientRecord] = {}
    for record in sorted(records, key=lambda r: (r.round, order[r.stage])):
        last[record.client_id] = record
    return [
        {"client": cid, "round": r.round, "stage": r.stage.value, "ok": r.ok}
        for cid, r in sorted(last.items())
    ]


__all__ = ["client_json", "clients_seen", "failure_json", "round_view", "store_view"]
