"""What a run directory holds, read for before/after comparisons in lifecycle tests."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from fedlearn.engine.store import RunStore

SKIPPED_FILES = {".run.lock", "run.db", "run.db-wal", "run.db-shm"}


def table_rows(db: Path, tables: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Every row of ``tables`` (all of them by default), as sorted reprs per table."""
    con = sqlite3.connect(db)
    try:
        names = tables or tuple(
            r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        )
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}"))) for t in names}
    finally:
        con.close()


def snapshot(directory: Path) -> dict[str, Any]:
    """Every committed row and the sha256 of every other file of a run directory."""
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in SKIPPED_FILES
    }
    return {"rows": table_rows(directory / "run.db"), "files": files}


def committed_round(db: Path, run_id: str) -> int:
    """The last committed round of ``run_id`` in ``db`` (0 if none, or no file yet)."""
    if not db.exists():
        return 0
    store = RunStore(db, run_id=run_id)
    try:
        return store.committed_round()
    finally:
        store.close()
