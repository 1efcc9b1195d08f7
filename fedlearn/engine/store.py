"""The run store: every round and every client's result in one SQLite file.

One transaction per round: the round row, its client rows and (optionally) the model
and strategy state commit together or not at all.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlearn.engine.messages import Stage
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.weights import load_verified, save_weights_atomically

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
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""


class RunStore:
    """SQLite-backed record of one or more runs (WAL mode)."""

    def __init__(self, path: str | Path, run_id: str = "run", checkpoint: bool = False) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.checkpoint = checkpoint
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def start_run(self, seed: int, config: dict[str, Any]) -> None:
        """Create (or reset) this store's run row."""
        with self._db:
            for table in ("client_results", "rounds", "checkpoints", "runs"):
                self._db.execute(f"DELETE FROM {table} WHERE run_id = ?", (self.run_id,))
            self._db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, 'running')",
                (self.run_id, time.time(), seed, json.dumps(config)),
            )
        self._prune_checkpoints(keep="")

    def resume_run(self, seed: int, config: dict[str, Any]) -> tuple[int, Arrays, Arrays] | None:
        """Continue this store's run if it has the same seed and config, else start afresh.

        Returns the last committed ``(round, arrays, state)`` to resume from, or None
        when the run starts from round 1.
        """
        info = self.run_info()
        same = info and info["seed"] == seed and info["config"] == json.loads(json.dumps(config))
        checkpoint = self.last_checkpoint() if same else None
        if checkpoint is None:
            self.start_run(seed, config)
            return None
        with self._db:
            self._db.execute(
                "DELETE FROM rounds WHERE run_id = ? AND round > ?", (self.run_id, checkpoint[0])
            )
            self._db.execute(
                "DELETE FROM client_results WHERE run_id = ? AND round > ?",
                (self.run_id, checkpoint[0]),
            )
            self._db.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", (self.run_id,))
        return checkpoint

    def finish_run(self, status: str = "finished") -> None:
        """Mark the run finished (or failed)."""
        with self._db:
            self._db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, self.run_id))

    def record_round(
        self, round: RoundRecord, clients: Sequence[ClientRecord], arrays: Arrays, state: Arrays
    ) -> None:
        """Write a round, its client rows and (if enabled) the checkpoint atomically."""
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
        rows = self._db.execute(
            "SELECT round, ok, train_selected, train_ok, eval_selected, eval_ok, train_metrics,"
            " eval_metrics, duration_s, error FROM rounds WHERE run_id = ? ORDER BY round",
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
            )
            for r in rows
        ]

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

    def run_ids(self) -> list[str]:
        """Every run recorded in this file, oldest first."""
        return [r[0] for r in self._db.execute("SELECT run_id FROM runs ORDER BY created")]

    def close(self) -> None:
        """Close the database."""
        self._db.close()
