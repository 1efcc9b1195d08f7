"""The run store: every round and every client's result in one SQLite file.

One transaction per round: the round row, the clients it selected from (when not every
enrolled client was there to select), its client rows and (optionally) the model and
strategy state commit together or not at all. Nothing here deletes a committed row:
a run is created once, its status and config move forward, every change to its config
and every start, resume, interruption and end is appended to its history.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlearn.drift.codec import from_bytes as summary_from_bytes
from fedlearn.drift.codec import to_bytes as summary_bytes
from fedlearn.drift.stats import DataSummary
from fedlearn.engine.messages import Stage
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.weights import load_verified, save_weights_atomically
from fedlearn.errors import FedlearnError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    train_selected INTEGER NOT NULL,
    train_ok INTEGER NOT NULL,
    eval_selected INTEGER NOT NULL,
    eval_ok INTEGER NOT NULL,
    train_metrics TEXT NOT NULL,
    eval_metrics TEXT NOT NULL,
    duration_s REAL NOT NULL,
    error TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS client_results (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    stage TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss REAL,
    metrics TEXT NOT NULL,
    error TEXT,
    PRIMARY KEY (run_id, round, stage, client_id)
);
CREATE TABLE IF NOT EXISTS candidates (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    clients TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS clock (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    virtual_time REAL NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS config_changes (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    field TEXT NOT NULL,
    old TEXT NOT NULL,
    new TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    round INTEGER NOT NULL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS privacy (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    events TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS data_stats (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id INTEGER NOT NULL,
    summary BLOB NOT NULL,
    PRIMARY KEY (run_id, round, client_id)
);
CREATE TABLE IF NOT EXISTS published (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    promoted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS site_evaluations (
    run_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    model TEXT,
    version INTEGER,
    client_id INTEGER NOT NULL,
    site TEXT NOT NULL,
    ok INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss REAL,
    metrics TEXT NOT NULL,
    error TEXT,
    PRIMARY KEY (run_id, entry, client_id)
);
"""

_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))


@dataclass(frozen=True)
class ConfigChange:
    """A config field that changed when a run resumed, from round ``round`` on."""

    round: int
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class RunEvent:
    """One entry of a run's history: started, resumed, interrupted, finished, failed."""

    at: float
    kind: str
    round: int
    detail: str | None = None


@dataclass(frozen=True)
class Publication:
    """A model version this run published after committing ``round``."""

    round: int
    model: str
    version: int
    promoted: bool
    reason: str


@dataclass(frozen=True)
class SiteEvaluation:
    """One cell of a cross-site evaluation (an evaluate-only run): model ``entry`` (a
    registry version ``model`` v``version``, or a site's own local model, whose ``model``
    and ``version`` are None) evaluated on site ``site`` (client ``client_id``)."""

    entry: str
    model: str | None
    version: int | None
    client_id: int
    site: str
    ok: bool
    num_examples: int
    loss: float | None
    metrics: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class PrivacyRow:
    """A round's differential-privacy accounting: ε at ``delta`` after the round, and the
    DP events the round added (``{"run": event or None, "clients": {id: event}}`` as
    :func:`fedlearn.privacy.accountant.event_to_json` writes them)."""

    round: int
    epsilon: float
    delta: float
    accountant: str
    events: dict[str, Any]


class RunStore:
    """SQLite-backed record of one or more runs (WAL mode)."""

    def __init__(
        self,
        path: str | Path,
        run_id: str = "run",
        checkpoint: bool = False,
        *,
        read_only: bool = False,
    ) -> None:
        """Open (creating if needed) the store at ``path``. ``read_only`` opens an
        existing store for reading only (a report, a live view): it takes no write lock,
        so it can never get in the way of the process that runs the run."""
        self.path = Path(path)
        self.run_id = run_id
        self.checkpoint = checkpoint
        self._closed = False
        if read_only:
            if not self.path.is_file():
                raise FedlearnError(f"{self.path} does not exist")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            return
        self._db = sqlite3.connect(self.path, timeout=30.0)
        # Only what is missing is written: a store that exists and is set up is opened
        # without a write, so opening it never races another process's transaction.
        if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        present = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if not present >= _TABLES:
            self._db.executescript(SCHEMA)

    def start_run(self, seed: int, config: dict[str, Any]) -> None:
        """Create this store's run row; FedlearnError if the store already holds it."""
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?, 'running')",
                    (self.run_id, time.time(), seed, json.dumps(config)),
                )
        except sqlite3.IntegrityError as exc:
            raise FedlearnError(f"{self.path} already holds run {self.run_id!r}") from exc
        self.add_event("started", 0)

    def set_status(self, status: str) -> None:
        """Move the run to ``status`` (running, finished, failed, interrupted)."""
        with self._db:
            self._db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, self.run_id))

    def update_config(self, config: dict[str, Any], changes: Sequence[ConfigChange]) -> None:
        """Store the run's current ``config`` and append each change to its history."""
        now = time.time()
        with self._db:
            self._db.execute(
                "UPDATE runs SET config = ? WHERE run_id = ?", (json.dumps(config), self.run_id)
            )
            self._db.executemany(
                "INSERT INTO config_changes VALUES (?,?,?,?,?,?)",
                [
                    (self.run_id, c.round, c.field, json.dumps(c.old), json.dumps(c.new), now)
                    for c in changes
                ],
            )

    def config_changes(self) -> list[ConfigChange]:
        """Every recorded config change of this run, oldest first."""
        rows = self._db.execute(
            "SELECT round, field, old, new FROM config_changes WHERE run_id = ? ORDER BY rowid",
            (self.run_id,),
        )
        return [ConfigChange(r[0], r[1], json.loads(r[2]), json.loads(r[3])) for r in rows]

    def add_event(self, kind: str, round: int, detail: str | None = None) -> None:
        """Append ``kind`` (after committed round ``round``) to the run's history."""
        with self._db:
            self._db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?)",
                (self.run_id, time.time(), kind, round, detail),
            )

    def events(self) -> list[RunEvent]:
        """The run's history, oldest first."""
        rows = self._db.execute(
            "SELECT at, kind, round, detail FROM events WHERE run_id = ? ORDER BY rowid",
            (self.run_id,),
        )
        return [RunEvent(*r) for r in rows]

    def add_publication(self, publication: Publication) -> None:
        """Record a model version this run published."""
        p = publication
        with self._db:
            self._db.execute(
                "INSERT INTO published VALUES (?,?,?,?,?,?,?)",
                (self.run_id, p.round, p.model, p.version, int(p.promoted), p.reason, time.time()),
            )

    def publications(self) -> list[Publication]:
        """Every version this run published, oldest first."""
        rows = self._db.execute(
            "SELECT round, model, version, promoted, reason FROM published WHERE run_id = ?"
            " ORDER BY rowid",
            (self.run_id,),
        )
        return [Publication(r[0], r[1], r[2], bool(r[3]), r[4]) for r in rows]

    def record_site_evaluations(self, rows: Sequence[SiteEvaluation]) -> None:
        """Commit cells of this run's cross-site matrix in one transaction; a cell already
        recorded is refused (FedlearnError), never overwritten."""
        try:
            with self._db:
                self._db.executemany(
                    "INSERT INTO site_evaluations VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            self.run_id,
                            r.entry,
                            r.model,
                            r.version,
                            r.client_id,
                            r.site,
                            int(r.ok),
                            r.num_examples,
                            r.loss,
                            json.dumps(r.metrics),
                            r.error,
                        )
                        for r in rows
                    ],
                )
        except sqlite3.IntegrityError as exc:
            raise FedlearnError(
                f"{self.path}: run {self.run_id!r} already holds one of these cells"
            ) from exc

    def site_evaluations(self) -> list[SiteEvaluation]:
        """This run's cross-site matrix cells, in the order they were recorded (none for
        a training run, or a store written before cross-site evaluation existed)."""
        if not self._has_table("site_evaluations"):
            return []
        rows = self._db.execute(
            "SELECT entry, model, version, client_id, site, ok, num_examples, loss, metrics,"
            " error FROM site_evaluations WHERE run_id = ? ORDER BY rowid",
            (self.run_id,),
        )
        return [
            SiteEvaluation(
                r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], json.loads(r[8]), r[9]
            )
            for r in rows
        ]

    def record_round(
        self,
        round: RoundRecord,
        clients: Sequence[ClientRecord],
        arrays: Arrays,
        state: Arrays,
        privacy: PrivacyRow | None = None,
    ) -> None:
        """Write a round, its client rows, its privacy row (if any) and (if enabled) the
        checkpoint atomically."""
        checkpoint = self._write_checkpoint(round.round, arrays, state) if self.checkpoint else None
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    self.run_id,
                    round.round,
                    int(round.ok),
                    round.train_selected,
                    round.train_ok,
                    round.eval_selected,
                    round.eval_ok,
                    json.dumps(round.train_metrics),
                    json.dumps(round.eval_metrics),
                    round.duration_s,
                    round.error,
                ),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO client_results VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        self.run_id,
                        c.round,
                        c.stage.value,
                        c.client_id,
                        int(c.ok),
                        c.num_examples,
                        c.loss,
                        json.dumps(c.metrics),
                        c.error,
                    )
                    for c in clients
                ],
            )
            if round.candidates is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO candidates VALUES (?,?,?)",
                    (self.run_id, round.round, json.dumps(list(round.candidates))),
                )
            if round.virtual_time is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO clock VALUES (?,?,?)",
                    (self.run_id, round.round, round.virtual_time),
                )
            if privacy is not None:
                self._db.execute(
                    "INSERT INTO privacy VALUES (?,?,?,?,?,?)",
                    (
                        self.run_id,
                        privacy.round,
                        privacy.epsilon,
                        privacy.delta,
                        privacy.accountant,
                        json.dumps(privacy.events),
                    ),
                )
            self._db.executemany(
                "INSERT OR REPLACE INTO data_stats VALUES (?,?,?,?)",
                [
                    (self.run_id, round.round, site, summary_bytes(summary))
                    for site, summary in sorted(round.data_stats.items())
                ],
            )
            if checkpoint is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                    (self.run_id, round.round, checkpoint[0], checkpoint[1]),
                )
        if checkpoint is not None:
            self._prune_checkpoints(keep=checkpoint[0])

    def _write_checkpoint(self, rnd: int, arrays: Arrays, state: Arrays) -> tuple[str, str]:
        """Model and strategy state as a safetensors file next to the database, written to
        a temporary name, synced and renamed; returns (file name, sha256). Files have no
        size limit (a SQLite blob stops at 1 GB) and are never unpickled."""
        name = f"{self.run_id}.round-{rnd}.safetensors"
        tensors = {f"arrays/{k}": v for k, v in arrays.items()}
        tensors.update({f"state/{k}": v for k, v in state.items()})
        return name, save_weights_atomically(tensors, self.path.parent / name)

    def _prune_checkpoints(self, keep: str) -> None:
        for old in self.path.parent.glob(f"{self.run_id}.round-*.safetensors"):
            if old.name != keep:
                old.unlink(missing_ok=True)

    def rounds(self) -> list[RoundRecord]:
        """Every recorded round of this run, in order."""
        # a store written before candidates were recorded has no such table
        candidates = "c.clients" if self._has_table("candidates") else "NULL"
        join = (
            " LEFT JOIN candidates c ON c.run_id = r.run_id AND c.round = r.round"
            if candidates != "NULL"
            else ""
        )
        # nor a clock table before virtual time was recorded
        clock = "k.virtual_time" if self._has_table("clock") else "NULL"
        if clock != "NULL":
            join += " LEFT JOIN clock k ON k.run_id = r.run_id AND k.round = r.round"
        rows = self._db.execute(
            "SELECT r.round, r.ok, r.train_selected, r.train_ok, r.eval_selected, r.eval_ok,"
            " r.train_metrics, r.eval_metrics, r.duration_s, r.error, "
            + candidates
            + ", "
            + clock
            + " FROM rounds r"
            + join
            + " WHERE r.run_id = ? ORDER BY r.round",
            (self.run_id,),
        )
        return [
            RoundRecord(
                r[0],
                bool(r[1]),
                r[2],
                r[3],
                r[4],
                r[5],
                json.loads(r[6]),
                json.loads(r[7]),
                r[8],
                r[9],
                None if r[10] is None else tuple(json.loads(r[10])),
                r[11],
            )
            for r in rows
        ]

    def privacy_rows(self) -> list[PrivacyRow]:
        """Every round's privacy row of this run, in round order (none without DP)."""
        if not self._has_table("privacy"):  # a store written before DP was accounted
            return []
        rows = self._db.execute(
            "SELECT round, epsilon, delta, accountant, events FROM privacy WHERE run_id = ?"
            " ORDER BY round",
            (self.run_id,),
        )
        return [PrivacyRow(r[0], float(r[1]), r[2], r[3], json.loads(r[4])) for r in rows]

    def data_stats(self, round: int | None = None) -> dict[int, dict[int, DataSummary]]:
        """Every recorded data summary of this run (or of one round): ``{round: {site:
        summary}}`` (site ``fedlearn.drift.POPULATION`` under secure aggregation); empty
        without drift monitoring."""
        if not self._has_table("data_stats"):  # a store written before drift monitoring
            return {}
        query = "SELECT round, client_id, summary FROM data_stats WHERE run_id = ?"
        params: tuple[Any, ...] = (self.run_id,)
        if round is not None:
            query += " AND round = ?"
            params += (round,)
        rows = self._db.execute(query + " ORDER BY round, client_id", params)
        out: dict[int, dict[int, DataSummary]] = {}
        for rnd, site, body in rows:
            out.setdefault(int(rnd), {})[int(site)] = summary_from_bytes(bytes(body))
        return out

    def _has_table(self, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def clients(self, stage: Stage | None = None) -> list[ClientRecord]:
        """Every recorded client result of this run (optionally one stage), in order."""
        query = (
            "SELECT round, stage, client_id, ok, num_examples, loss, metrics, error"
            " FROM client_results WHERE run_id = ?"
        )
        params: tuple[Any, ...] = (self.run_id,)
        if stage is not None:
            query += " AND stage = ?"
            params += (stage.value,)
        rows = self._db.execute(query + " ORDER BY round, stage, client_id", params)
        return [
            ClientRecord(r[0], Stage(r[1]), r[2], bool(r[3]), r[4], r[5], json.loads(r[6]), r[7])
            for r in rows
        ]

    def run_info(self) -> dict[str, Any]:
        """The run row: seed, config, status."""
        row = self._db.execute(
            "SELECT created, seed, config, status FROM runs WHERE run_id = ?", (self.run_id,)
        ).fetchone()
        if row is None:
            return {}
        return {
            "run_id": self.run_id,
            "created": row[0],
            "seed": row[1],
            "config": json.loads(row[2]),
            "status": row[3],
        }

    def last_checkpoint(self) -> tuple[int, Arrays, Arrays] | None:
        """The last committed (round, arrays, state), if checkpoints are kept; the file's
        digest is checked against the one committed with the round."""
        row = self._db.execute(
            "SELECT round, file, sha256 FROM checkpoints WHERE run_id = ?", (self.run_id,)
        ).fetchone()
        if row is None:
            return None
        tensors = load_verified(self.path.parent / row[1], row[2], "checkpoint")
        arrays = {k[7:]: v for k, v in tensors.items() if k.startswith("arrays/")}
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
        return row[0], arrays, state

    def committed_round(self) -> int:
        """The last committed round of this run (0 before the first)."""
        row = self._db.execute(
            "SELECT MAX(round) FROM rounds WHERE run_id = ?", (self.run_id,)
        ).fetchone()
        return int(row[0] or 0)

    def run_ids(self) -> list[str]:
        """Every run recorded in this file, oldest first."""
        return [r[0] for r in self._db.execute("SELECT run_id FROM runs ORDER BY created")]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._closed = True
        self._db.close()
