"""The run lifecycle shared by ``fedlearn simulate`` and the coordinator daemon.

A run lives in one directory (a simulation's run directory, a coordinator's state
directory): its run store ``run.db``, the last round's checkpoint, ``config.json``, the
final ``model.safetensors`` and the report files. This module owns what happens to it:

* **open**: create the run, or find the one there and decide whether it may continue.
  Identity fields (:mod:`fedlearn.run.identity`) must match, else :class:`RunConflict`
  lists each differing field and the ways out; operational changes are recorded with the
  round they take effect from; a finished run with no more rounds to run is left as is.
  Starting a new run over an existing one needs ``new_run``, which moves the old run
  aside to ``<dir>.N`` (nothing is deleted). One process at a time holds a directory.
* **commit**: each round, its client records and checkpoint in one transaction, then
  the round's publication when one is due.
* **finish**: the true status (``finished``, also when a privacy budget stopped training
  early, which a note and a ``stopped`` event say; ``failed`` when no round was ever
  applied or the run raised; ``interrupted`` on Ctrl-C, SIGTERM or a stop request), the
  final model, the final publication, the report.
* **tracking**: with ``[tracking] mlflow_uri`` in the config, the run goes to MLflow as
  it runs (:mod:`fedlearn.tracking`): started or taken up when the run opens, each
  committed round, each publication, the end; a tracking failure never fails the run.
* **privacy**: with a :class:`~fedlearn.privacy.tracker.PrivacyTracker` attached, each
  round commits its ε with it, and :meth:`RunLifecycle.stop_before` ends training before
  a round that would exceed the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

from pydantic import BaseModel

from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord, RoundRecord, RunResult
from fedlearn.engine.store import ConfigChange, Publication, RunStore
from fedlearn.engine.weights import save_weights_atomically
from fedlearn.errors import ConfigError, RunConflict, RunInterrupted
from fedlearn.run.identity import FieldChange, as_stored, differences, stored_as
from fedlearn.tracking import Tracking, start_tracking

if TYPE_CHECKING:
    from fedlearn.privacy.tracker import PrivacyTracker
    from fedlearn.registry.publish import Published, Publisher
    from fedlearn.ui.events import EventBus

log = logging.getLogger("fedlearn.run")

LOCK_FILE = ".run.lock"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class Start(StrEnum):
    """How a command treats a directory that may already hold a run."""

    NEW = "new"
    """A new run: a directory that holds one is refused (or moved aside with new_run)."""
    RESUME = "resume"
    """Continue the run there; with none there, start it."""
    AUTO = "auto"
    """The coordinator: continue the run there, or start it."""


class Status(StrEnum):
    """A run's status in its store."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class RunSpec:
    """What the lifecycle needs to know about a run, whichever command starts it."""

    directory: Path
    name: str
    seed: int
    rounds: int
    config: BaseModel
    resume_command: str
    """The command that continues this run (shown when it is interrupted)."""
    new_run_option: str = "--new-run"
    """How the user asks to start over (named in conflict errors)."""
    keep: tuple[Path, ...] = ()
    """Entries of the directory that stay in place when the run moves aside (a registry
    kept inside a coordinator's state directory is shared by its runs)."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run command ended."""

    directory: Path
    status: Status
    rounds: list[RoundRecord]
    """Every committed round of the run, this process's and earlier ones."""
    result: RunResult | None
    """What this process ran (None when the run was already finished)."""
    published: list[Published] = field(default_factory=list)
    already_finished: bool = False
    notes: list[str] = field(default_factory=list)


class RunLifecycle:
    """One open run directory; build it with :func:`open_run`, drive it with :meth:`drive`."""

    def __init__(
        self,
        spec: RunSpec,
        store: RunStore,
        lock: IO[str],
        *,
        start_round: int,
        already_finished: bool,
        notes: list[str],
    ) -> None:
        self.spec = spec
        self.store = store
        self._lock = lock
        self.start_round = start_round
        self.already_finished = already_finished
        self.notes: list[str] = []
        for text in notes:
            self.note(text)
        self.publisher: Publisher | None = None
        self.publish_every = 0
        self.published: list[Published] = []
        self.privacy: PrivacyTracker | None = None
        self.tracking: Tracking | None = None
        if not already_finished:
            self.tracking = start_tracking(spec.config, spec.name, spec.directory, store)
        self.events: EventBus | None = None
        """Where the run's start, ε, published versions and end are emitted (a live page)."""

    def account_privacy(self, tracker: PrivacyTracker) -> None:
        """Account each round's DP with ``tracker``, which first takes the committed
        rounds' privacy rows back from the store (a resumed run's ε continues)."""
        tracker.restore(self.store.privacy_rows())
        self.privacy = tracker

    def stop_before(self, round: int) -> str | None:
        """Why round ``round`` must not run (a privacy budget), or None: the coordinator's
        ``stop_before``."""
        return None if self.privacy is None else self.privacy.stop_reason(round)

    # ------------------------------------------------------------------ driving

    def drive(
        self,
        initial: Callable[[], Arrays],
        run: Callable[[Arrays, Arrays | None, int], RunResult],
    ) -> RunOutcome:
        """Run the rounds left (``run(arrays, state, start_round)``) and finish the run.

        ``initial`` builds the model of a run that has no committed round yet. Ctrl-C and
        SIGTERM (in the main thread) stop at the last committed round: the run is marked
        interrupted and :class:`RunInterrupted` says how to continue; any other error
        marks it failed and propagates. The directory is released in every case.
        """
        if self.already_finished:
            return self.leave()
        try:
            checkpoint = self.store.last_checkpoint() if self.start_round > 1 else None
            arrays, state = (initial(), None) if checkpoint is None else checkpoint[1:]
            if self.events is not None:
                self.events.run_started(self.spec.name, self.spec.rounds, self.start_round)
            with _signals_as_interrupts() as received:
                try:
                    return self._finish(run(arrays, state, self.start_round))
                except KeyboardInterrupt:
                    raise self._interrupted(received[-1] if received else signal.SIGINT) from None
                except RunInterrupted:
                    raise self._interrupted(None) from None
        except RunInterrupted:
            raise
        except BaseException as exc:
            self._end(Status.FAILED, _describe(exc))
            raise
        finally:
            self.close()

    def note(self, text: str) -> None:
        """Say something about the run to its user (logged as ``fedlearn.run``, kept in
        the outcome)."""
        self.notes.append(text)
        log.info("%s", text)

    def leave(self) -> RunOutcome:
        """Release a run that is already finished, untouched, and say so."""
        try:
            return RunOutcome(
                self.spec.directory,
                Status.FINISHED,
                self.store.rounds(),
                None,
                already_finished=True,
                notes=self.notes,
            )
        finally:
            self.close()

    def record_round(
        self, round: RoundRecord, clients: Sequence[ClientRecord], arrays: Arrays, state: Arrays
    ) -> None:
        """Commit one round (signals wait until the commit is whole), then publish it
        when publishing every N rounds is on and this round is due."""
        with _deferred_signals():
            row = None if self.privacy is None else self.privacy.record(round, clients)
            self.store.record_round(round, clients, arrays, state, row)
        if self.tracking is not None:
            self.tracking.round(round, clients, row)
        if self.events is not None and row is not None:
            self.events.privacy(row.round, row.epsilon, row.delta)
        if (
            self.publisher is not None
            and self.publish_every
            and round.ok
            and round.round % self.publish_every == 0
        ):
            self._publish(arrays, round, clients, round.round)

    def close(self) -> None:
        """Close the store and release the directory (idempotent)."""
        self.store.close()
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # ------------------------------------------------------------------ ending

    def _finish(self, result: RunResult) -> RunOutcome:
        if result.stopped is not None:
            self.note(result.stopped)
            self.store.add_event("stopped", self.store.committed_round(), result.stopped)
        rounds = self.store.rounds()
        applied = [r for r in rounds if r.ok]
        save_weights_atomically(
            result.arrays,
            self.spec.directory / MODEL_FILE,
            {"run": self.spec.name, "rounds": str(len(rounds))},
        )
        if self.publisher is not None and applied:
            last = applied[-1]
            if last.round not in {p.round for p in self.store.publications()}:
                self._publish(result.arrays, last, self.store.clients(), last.round)
        status = Status.FINISHED if applied else Status.FAILED
        self._end(status, None if applied else "no round was applied")
        return RunOutcome(
            self.spec.directory, status, rounds, result, list(self.published), notes=self.notes
        )

    def _interrupted(self, signum: int | None) -> RunInterrupted:
        committed = self.store.committed_round()
        how = "" if signum is None else signal.Signals(signum).name
        self._end(Status.INTERRUPTED, how or "stop requested")
        log.info("interrupted after round %d", committed)
        return RunInterrupted(committed, self.spec.resume_command, signum)

    def _end(self, status: Status, detail: str | None) -> None:
        """Record how the run ended and write its report (a failing report is logged)."""
        if self.store.closed:
            return
        self.store.set_status(status)
        self.store.add_event(status.value, self.store.committed_round(), detail)
        if self.events is not None:
            self.events.status(status.value, self.store.committed_round(), detail)
        try:
            from fedlearn.report.files import write_report

            write_report(self.store, self.spec.directory)
        except Exception as exc:  # the run's own outcome matters more than its report
            log.warning("could not write the report: %s", _describe(exc))
        if self.tracking is not None:
            self.tracking.finish(status.value)

    def _publish(
        self, arrays: Arrays, round: RoundRecord, clients: Sequence[ClientRecord], number: int
    ) -> None:
        assert self.publisher is not None
        privacy = None if self.privacy is None else self.privacy.metrics_at(number)
        stats = self.store.data_stats(number).get(number)
        published = self.publisher.publish(arrays, round, clients, number, privacy, stats)
        self.published.append(published)
        v, d = published.version, published.decision
        publication = Publication(number, v.name, v.version, d.promoted, d.reason)
        self.store.add_publication(publication)
        if self.tracking is not None:
            self.tracking.published(publication, self.publisher.root)
        if self.events is not None:
            self.events.published(number, v.name, v.version, d.promoted, d.reason)


def open_run(spec: RunSpec, start: Start, new_run: bool = False) -> RunLifecycle:
    """Open ``spec.directory`` for ``spec``'s run as ``start`` says (see the module doc).

    RunConflict when the directory holds a different run, holds a run and neither resume
    nor ``new_run`` was asked for, or is used by another process.
    """
    if new_run and start is not Start.NEW:
        raise ConfigError("--new-run starts the run over; it cannot be combined with resuming")
    directory = spec.directory
    directory.mkdir(parents=True, exist_ok=True)
    lock = _lock(directory)
    try:
        if new_run and _holds_run(directory):
            aside = move_aside(directory, spec.keep, lock)
            lock = _lock(directory)
            return _create(spec, lock, [f"the previous run in {directory} moved to {aside}"])
        if not _holds_run(directory):
            fresh = start is Start.RESUME
            return _create(spec, lock, [f"no run to resume in {directory}; starting it"] * fresh)
        return _reopen(spec, start, lock)
    except BaseException:
        if not lock.closed:
            lock.close()
        raise


def _create(spec: RunSpec, lock: IO[str], notes: list[str]) -> RunLifecycle:
    store = RunStore(spec.directory / "run.db", run_id=spec.name, checkpoint=True)
    store.start_run(spec.seed, as_stored(spec.config))
    _write_config(spec)
    return RunLifecycle(spec, store, lock, start_round=1, already_finished=False, notes=notes)


def _reopen(spec: RunSpec, start: Start, lock: IO[str]) -> RunLifecycle:
    directory = spec.directory
    probe = RunStore(directory / "run.db", read_only=True)
    ids = probe.run_ids()
    probe.close()
    held = spec.name if spec.name in ids else ids[-1]
    store = RunStore(directory / "run.db", run_id=held, checkpoint=True)
    try:
        info = store.run_info()
        kind = type(spec.config).__name__
        old = stored_as(type(spec.config), info["config"])
        if held != spec.name:  # the run's name is part of its identity
            old = {**old, "run": {**old.get("run", {}), "name": held}}
        identity, operational = differences(kind, old, as_stored(spec.config))
        committed = store.committed_round()
        status = info["status"]
        state = f"{status}, {committed} of {old.get('run', {}).get('rounds', '?')} rounds"
        if identity:
            raise RunConflict(_conflict(spec, held, state, identity))
        if start is Start.NEW:
            raise RunConflict(
                f"{directory} already holds run {held!r} ({state}). Continue it with "
                f"--resume, start it over with {spec.new_run_option} (the old run moves "
                f"to {next_aside(directory)}; nothing is deleted), or choose another "
                "directory."
            )
        if status == Status.FINISHED and committed >= spec.rounds:
            note = (
                f"run {held!r} in {directory} is already finished ({committed} rounds); "
                "raise run.rounds to continue it"
            )
            return RunLifecycle(
                spec, store, lock, start_round=committed + 1, already_finished=True, notes=[note]
            )
        notes = [f"resuming after committed round {committed}"] if committed else []
        changes = [ConfigChange(committed + 1, c.field, c.old, c.new) for c in operational]
        store.update_config(as_stored(spec.config), changes)
        notes += [f"changed from round {committed + 1}: {c.describe()}" for c in operational]
        store.set_status(Status.RUNNING)
        store.add_event("resumed", committed, "; ".join(c.describe() for c in operational) or None)
        _write_config(spec)
        return RunLifecycle(
            spec, store, lock, start_round=committed + 1, already_finished=False, notes=notes
        )
    except BaseException:
        store.close()
        raise


def _conflict(spec: RunSpec, held: str, state: str, identity: list[FieldChange]) -> str:
    fields = "\n".join(f"  {c.describe()}" for c in identity)
    return (
        f"{spec.directory} holds run {held!r} ({state}), which differs in what makes a "
        f"run what it is:\n{fields}\nNothing was changed. To keep that run, use another "
        f"directory; to start over here, add {spec.new_run_option} (the old run moves to "
        f"{next_aside(spec.directory)}; nothing is deleted)."
    )


# ------------------------------------------------------------------ the directory


def _holds_run(directory: Path) -> bool:
    db = directory / "run.db"
    if not db.is_file():
        return False
    store = RunStore(db, read_only=True)
    try:
        return bool(store.run_ids())
    finally:
        store.close()


def _lock(directory: Path) -> IO[str]:
    """An exclusive lock on ``directory`` for this process; RunConflict if it is taken."""
    handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunConflict(
            f"{directory} is in use by another fedlearn process (pid {holder})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def next_aside(directory: Path) -> Path:
    """``<dir>.N``, the first N >= 1 that does not exist."""
    n = 1
    while directory.with_name(f"{directory.name}.{n}").exists():
        n += 1
    return directory.with_name(f"{directory.name}.{n}")


def move_aside(directory: Path, keep: Sequence[Path], lock: IO[str]) -> Path:
    """Move everything in ``directory`` but ``keep`` to ``<dir>.N`` (released lock and
    all); returns where it went. Nothing is deleted."""
    target = next_aside(directory)
    target.mkdir()
    kept = {p.resolve() for p in keep}
    for entry in sorted(directory.iterdir()):
        if entry.resolve() in kept or entry.name == LOCK_FILE:
            continue
        entry.rename(target / entry.name)
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    return target


def _write_config(spec: RunSpec) -> None:
    path = spec.directory / CONFIG_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(spec.config.model_dump_json(indent=2))
    os.replace(tmp, path)


# ------------------------------------------------------------------ signals


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[list[int]]:
    """In the main thread, SIGTERM interrupts like Ctrl-C does (KeyboardInterrupt); the
    list collects which signals arrived."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, interrupt)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a round commits; deliver them right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in pending:
            signal.raise_signal(signum)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


__all__ = [
    "RunLifecycle",
    "RunOutcome",
    "RunSpec",
    "Start",
    "Status",
    "move_aside",
    "next_aside",
    "open_run",
]
