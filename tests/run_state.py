"""What a run directory holds, read for before/after comparisons in lifecycle tests."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

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
    """The last committed round of ``run_id`` in ``db`` (0 if none, or no file or table yet).

    Only reads (the query of ``RunStore.committed_round``): tests poll this while a
    ``fedlearn`` process creates ``db``, and a ``RunStore`` opened here sets WAL mode and
    creates the schema too, which can make that process's own ``RunStore`` fail with
    "database is locked" (SQLite answers a lock upgrade that could deadlock at once, with
    no busy wait). A read that finds the database locked or not created yet says 0.
    """
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT MAX(round) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()
    except sqlite3.OperationalError:  # no rounds table yet, or locked: poll again
        return 0
    finally:
        con.close()
    return int(row[0] or 0)
