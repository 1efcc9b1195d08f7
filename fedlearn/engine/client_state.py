"""A client's own state across rounds, and the stores that keep it wherever it trains.

Some algorithms keep memory at the client between its rounds (SCAFFOLD's control variate
``c_i``, a personalized layer, a Flower app's ``context.state``). A ClientApp reads and
changes ``ctx.state`` (a :class:`ClientState`: named arrays and JSON values) in
``train`` (or ``evaluate``); the client runtime loads it before the task and saves it
after the task succeeds, in a :class:`ClientStateStore`:

* :class:`MemoryStateStore`: this process (the in-process backend's default; a site
  daemon without ``client.state_dir``);
* :class:`DirectoryStateStore`: files in a directory, ``client-<id>.state``, shared by
  every process that opens it: the pool's workers and local Ray actors (a client may
  train in one worker in round 1 and another in round 2), a ``fedlearn simulate`` run
  (``<run dir>/client-state``, so a resumed run finds every client's state) and a site
  (``client.state_dir``, on its local disk).

**Versions by round.** Each save records the round it was made in, and the store keeps
the version before it too. ``load(client, before=r)`` returns the newest version saved
before round ``r``, so a round that runs again after a crash (its tasks ran, the
coordinator died before committing it) starts every client from the state it had before
that round, not from the state the lost round left: resume stays bit-identical. Training
in round ``r`` loads ``before=r``; evaluation after it loads ``before=r + 1``, and saving
it replaces that round's version.

A state never touched by the app is neither loaded nor saved, and an empty state is not
written for a client that has none: apps without state pay nothing. The bytes are a JSON
frame (the values) and one :func:`~fedlearn.engine.records.encode_arrays` frame (raw
arrays), after the round as 8 bytes; never pickled.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedlearn.engine.messages import frame, unframe
from fedlearn.engine.records import (
    Arrays,
    decode_arrays,
    decode_json,
    encode_arrays,
    encode_json,
)
from fedlearn.errors import SerializationError

__all__ = [
    "ClientState",
    "ClientStateStore",
    "DirectoryStateStore",
    "MemoryStateStore",
    "open_state_store",
]

_ROUND = struct.Struct("<q")


@dataclass
class ClientState:
    """What one client keeps for itself between its tasks: named arrays (raw, any
    bool/int/float dtype) and JSON-serializable ``values``. Change it in place."""

    arrays: Arrays = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.arrays) or bool(self.values)

    def encode(self) -> bytes:
        """The state as bytes (no pickle)."""
        arrays = {str(k): np.asarray(v) for k, v in self.arrays.items()}
        return frame([encode_json(self.values), encode_arrays(arrays)])

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ClientState:
        """Bytes made by :meth:`encode` back to a state (writable arrays)."""
        parts = list(unframe(data))
        if len(parts) != 2:
            raise SerializationError("a client state has two frames")
        values = decode_json(parts[0])
        if not isinstance(values, dict):
            raise SerializationError("a client state's values must be a JSON object")
        arrays = {k: np.array(v) for k, v in decode_arrays(parts[1]).items()}
        return cls(arrays, values)

    def copy(self) -> ClientState:
        """A deep copy (arrays copied)."""
        return ClientState({k: np.array(v) for k, v in self.arrays.items()}, dict(self.values))


class ClientStateStore(Protocol):
    """Where each client's :class:`ClientState` lives between its tasks."""

    def load(self, client_id: int, before: int) -> ClientState:
        """The newest state saved in a round before ``before`` (empty if none)."""
        ...

    def save(self, client_id: int, round: int, state: ClientState) -> None:
        """Keep ``state`` as what the client had after round ``round``."""
        ...


class MemoryStateStore:
    """States in this process: per client, the last two versions by round."""

    def __init__(self) -> None:
        self._versions: dict[int, list[tuple[int, ClientState]]] = {}

    def load(self, client_id: int, before: int) -> ClientState:
        """A copy of the newest version saved before round ``before``."""
        for rnd, state in reversed(self._versions.get(client_id, [])):
            if rnd < before:
                return state.copy()
        return ClientState()

    def save(self, client_id: int, round: int, state: ClientState) -> None:
        """Keep a copy; a second save in the same round replaces the first."""
        if not state and client_id not in self._versions:
            return
        kept = [(r, s) for r, s in self._versions.get(client_id, []) if r < round]
        self._versions[client_id] = [*kept[-1:], (round, state.copy())]


class DirectoryStateStore:
    """States as files in ``directory`` (made if missing): ``client-<id>.state`` holds
    the newest version and ``client-<id>.prev.state`` the one before. Each file starts
    with the round it was saved in (8 bytes). Writes are atomic (a temporary file renamed
    into place); a client has one task at a time, so no two processes write one file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, client_id: int) -> tuple[Path, Path]:
        cid = int(client_id)
        return (
            self.directory / f"client-{cid}.state",
            self.directory / f"client-{cid}.prev.state",
        )

    def load(self, client_id: int, before: int) -> ClientState:
        """The newest version saved before round ``before``: the file, or the one before."""
        for path in self._paths(client_id):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if len(data) < _ROUND.size:
                raise SerializationError(f"{path} is truncated")
            (rnd,) = _ROUND.unpack_from(data)
            if rnd < before:
                return ClientState.decode(memoryview(data)[_ROUND.size :])
        return ClientState()

    def save(self, client_id: int, round: int, state: ClientState) -> None:
        """Write ``state`` for ``round``; the newest version of an earlier round becomes
        the one before (a version of this round is replaced, its predecessor kept)."""
        current, previous = self._paths(client_id)
        saved = _saved_round(current)
        if saved is None and not state:
            return  # nothing kept, nothing to keep
        if saved is not None and saved < round:
            os.replace(current, previous)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{current.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_ROUND.pack(round))
                f.write(state.encode())
            os.replace(tmp, current)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _saved_round(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_ROUND.size)
    except FileNotFoundError:
        return None
    if len(head) < _ROUND.size:
        return None
    return int(_ROUND.unpack(head)[0])


def open_state_store(directory: str | Path | None) -> ClientStateStore:
    """A :class:`DirectoryStateStore` over ``directory``, or in memory for None."""
    return MemoryStateStore() if directory is None else DirectoryStateStore(directory)
