"""The coordinator's live allowlist: enrolled sites, their client ids, and revocations.

The allowlist file is re-read while the coordinator runs: every ``poll_s`` seconds
(``server.allowlist_poll_s``), and at once on SIGHUP when the coordinator runs in the
main thread. On a change:

* the authenticator gets the new allowlist first, so a key no longer admitted cannot
  start or finish a join from then on;
* a site that is no longer admitted (``revoked = true``, its entry removed, or its
  ``public_key`` replaced) is reported to ``on_revoke`` with the reason, and the
  coordinator ends its stream (PERMISSION_DENIED) and fails its tasks in flight;
* a site that is new gets the next client id and may join at once.

Client ids are assigned by site name and never change or get reused: the allowlist's
order at the run's start (as before), then one more per newly enrolled name. A removed
name keeps its id, and gets it back if it is enrolled again. The assignment is kept in
the state directory (``client_ids.json``), so a restart with an edited allowlist keeps
every site's id, and with it the meaning of the run store's per-client rows.

A file that does not parse (say, half-edited by hand) is logged and ignored: the last
good allowlist stays in force. ``fedlearn keys revoke`` and ``keys enroll`` replace the
file atomically, so the coordinator never sees half of an edit they make.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from fedlearn.errors import ConfigError
from fedlearn.security.auth import Authenticator
from fedlearn.security.keys import Allowlist, SiteEntry, parse_allowlist, write_file_atomic

log = logging.getLogger("fedlearn.server")

IDS_FILE = "client_ids.json"
REFRESH_S = 0.1
"""Least time between two re-reads asked for by unknown keys."""

Revoke = Callable[[str, int, str], object]
"""``on_revoke(site name, client id, reason)``."""


@dataclass(frozen=True)
class Change:
    """What one reload changed."""

    enrolled: tuple[str, ...]
    revoked: dict[str, str]
    """Site name -> why it may no longer take part."""


class Enrollment:
    """Sites, their client ids, and the file they come from. Thread-safe."""

    def __init__(
        self,
        authenticator: Authenticator,
        path: str | Path | None = None,
        *,
        ids_file: str | Path | None = None,
    ) -> None:
        self.auth = authenticator
        self.path = None if path is None else Path(path)
        self.on_revoke: Revoke | None = None
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._digest = b""
        self._bad_digest = b""
        self._ids_file: Path | None = None
        self._refreshed = -REFRESH_S
        self._reloading = threading.Lock()
        self._assign(authenticator.allowlist)
        # The first reload re-reads the file: the same sites change nothing, and an edit
        # made since the authenticator's allowlist was read is not missed.
        if ids_file is not None:
            self.keep_ids_in(ids_file)
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None

    # -- client ids -----------------------------------------------------------------------

    def keep_ids_in(self, ids_file: str | Path) -> None:
        """Take the ids a previous process of this run assigned (``ids_file``, if it
        exists), then keep the assignment there."""
        target = Path(ids_file)
        with self._lock:
            if target.exists():
                saved = _read_ids(target)
                self._ids = saved
                self._assign_locked(self.auth.allowlist)
            self._ids_file = target
            self._save_locked()

    def client_id(self, name: str) -> int | None:
        """The client id of site ``name`` (None if it was never enrolled)."""
        with self._lock:
            return self._ids.get(name)

    def active_ids(self) -> list[int]:
        """Client ids of the sites the allowlist admits now, ascending."""
        allowlist = self.auth.allowlist
        with self._lock:
            return sorted(self._ids[e.name] for e in allowlist if not e.revoked)

    @property
    def ids(self) -> EnrolledIds:
        """A live view of :meth:`active_ids` for the coordinator's round loop."""
        return EnrolledIds(self)

    def _assign(self, allowlist: Allowlist) -> list[str]:
        with self._lock:
            return self._assign_locked(allowlist)

    def _assign_locked(self, allowlist: Allowlist) -> list[str]:
        new = [e.name for e in allowlist if e.name not in self._ids]
        for name in new:
            self._ids[name] = max(self._ids.values(), default=-1) + 1
        return new

    def _save_locked(self) -> None:
        if self._ids_file is None:
            return
        body = {"version": 1, "sites": dict(sorted(self._ids.items(), key=lambda kv: kv[1]))}
        write_file_atomic(
            self._ids_file, (json.dumps(body, indent=1) + "\n").encode(), mode=0o644, overwrite=True
        )

    # -- reloading ------------------------------------------------------------------------

    def reload(self) -> Change | None:
        """Re-read the allowlist file; apply and return what changed (None: nothing did,
        or the file is unreadable or invalid, which is logged once per version)."""
        if self.path is None:
            return None
        with self._reloading:  # the watcher and a Hello may both ask
            return self._reload(self.path)

    def _reload(self, path: Path) -> Change | None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            digest = f"unreadable:{exc.errno}".encode()
            if digest != self._bad_digest:
                self._bad_digest = digest
                log.warning(
                    "allowlist %s cannot be read (%s); the previous one stays in force",
                    self.path,
                    exc.strerror,
                )
            return None
        digest = hashlib.sha256(data).digest()
        if digest in (self._digest, self._bad_digest):
            return None
        try:
            allowlist = parse_allowlist(data.decode("utf-8"), source=str(self.path))
        except (ConfigError, UnicodeDecodeError) as exc:
            self._bad_digest = digest
            log.warning("%s; the previous allowlist stays in force", exc)
            return None
        return self.apply(allowlist, digest)

    def refresh(self) -> Change | None:
        """:meth:`reload`, unless the file was read less than ``REFRESH_S`` ago (a Hello
        for an unknown key asks for this, and anyone can send those)."""
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed < REFRESH_S:
                return None
            self._refreshed = now
        return self.reload()

    def apply(self, allowlist: Allowlist, digest: bytes = b"") -> Change:
        """Put ``allowlist`` in force (what :meth:`reload` does with a changed file)."""
        old = self.auth.allowlist
        with self._lock:
            self._digest, self._bad_digest = digest, b""
            enrolled = self._assign_locked(allowlist)
            if enrolled:
                self._save_locked()
        self.auth.replace_allowlist(allowlist)  # before any session is ended
        revoked = {
            entry.name: reason
            for entry in old
            if not entry.revoked and (reason := _why_gone(entry, allowlist)) is not None
        }
        change = Change(tuple(enrolled), revoked)
        for name in enrolled:
            log.info("site %s enrolled as client %d", name, self._ids[name])
        for name, reason in revoked.items():
            log.warning("%s", reason)
            if self.on_revoke is not None:
                self.on_revoke(name, self._ids[name], reason)
        for entry in allowlist:
            before = old.by_name(entry.name)
            if not entry.revoked and before is not None and before.revoked:
                log.info("site %s may join again (client %d)", entry.name, self._ids[entry.name])
        return change

    # -- watching -------------------------------------------------------------------------

    def watch(self, poll_s: float) -> None:
        """Reload every ``poll_s`` seconds (and whenever :meth:`poke` is called) in a
        daemon thread until :meth:`close`."""
        if self._thread is not None or self.path is None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self._poke.wait(poll_s)
                self._poke.clear()
                if self._stop.is_set():
                    return
                try:
                    self.reload()
                except Exception:  # a bug here must not end the watching
                    log.exception("reloading the allowlist %s failed", self.path)

        self._thread = threading.Thread(target=loop, name="fedlearn-allowlist", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Reload now (safe from a signal handler: it only sets an event)."""
        self._poke.set()

    def close(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _why_gone(entry: SiteEntry, allowlist: Allowlist) -> str | None:
    now = allowlist.by_name(entry.name)
    if now is None:
        return f"site {entry.name!r} was removed from the allowlist"
    if now.revoked:
        return f"site {entry.name!r} was revoked"
    if now.public_key != entry.public_key:
        return f"site {entry.name!r} was given a new key; its old key was revoked"
    return None


def _read_ids(path: Path) -> dict[str, int]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        sites = body["sites"]
        ids = {str(name): int(cid) for name, cid in sites.items()}
        if (
            body.get("version") != 1
            or len(set(ids.values())) != len(ids)
            or any(cid < 0 for cid in ids.values())
        ):
            raise ValueError("bad content")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{path} (the run's client id of each site) cannot be read: {exc}; restore it, "
            "or start the run over with --new-run"
        ) from None
    return ids


class EnrolledIds(Sequence[int]):
    """The client ids of the sites admitted now; re-evaluated on every use."""

    def __init__(self, enrollment: Enrollment) -> None:
        self._enrollment = enrollment

    def _now(self) -> list[int]:
        return self._enrollment.active_ids()

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        return self._now()[index]

    def __len__(self) -> int:
        return len(self._now())

    def __iter__(self) -> Iterator[int]:
        return iter(self._now())

    def __contains__(self, value: object) -> bool:
        return value in self._now()

    def __repr__(self) -> str:
        return f"EnrolledIds({self._now()})"
