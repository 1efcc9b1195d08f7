"""Run tracking: each run, as it goes, in an MLflow tracking store (``[tracking]``).

:func:`start_tracking` is what the run lifecycle (:mod:`fedlearn.run.lifecycle`) calls for
``fedlearn simulate`` and the coordinator alike; :class:`Tracking` makes sure tracking
never fails or loses a run: the first error is logged as a warning (and recorded in the
run store as a ``tracking-failed`` event), tracking stays off for the rest of the
process, the run goes on, and the next start of the run logs what was missed from its
store. MLflow is imported only when tracking is on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import PrivacyRow, Publication, RunStore

if TYPE_CHECKING:
    from fedlearn.tracking.mlflow_run import MlflowRun

log = logging.getLogger("fedlearn.tracking")


class Tracking:
    """A run's tracking sink, guarded: no error gets out of it (see the module doc)."""

    def __init__(
        self, store: RunStore, make: Callable[[], MlflowRun], uri: str | None = None
    ) -> None:
        self.store = store
        self.uri = uri
        self.error: str | None = None
        self.sink: MlflowRun | None = None
        self._call("start", lambda: self._start(make))

    @property
    def active(self) -> bool:
        """Whether tracking is on and has not failed."""
        return self.sink is not None and self.error is None

    def round(
        self, round: RoundRecord, clients: Sequence[ClientRecord], privacy: PrivacyRow | None
    ) -> None:
        """A committed round."""
        if self.sink is not None:
            sink = self.sink
            self._call(f"round {round.round}", lambda: sink.round(round, clients, privacy))

    def published(self, publication: Publication, registry_root: Path) -> None:
        """A version the run published."""
        if self.sink is not None:
            sink = self.sink
            what = f"the link to {publication.model} v{publication.version}"
            self._call(what, lambda: sink.published(publication, registry_root))

    def finish(self, status: str) -> None:
        """The run ended with ``status``."""
        if self.sink is not None:
            sink = self.sink
            self._call("the end of the run", lambda: sink.finish(status))

    def _start(self, make: Callable[[], MlflowRun]) -> None:
        sink = make()
        sink.start(self.store)
        self.sink = sink

    def _call(self, what: str, action: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            action()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if self.uri:  # the store's address without its password, if it has one
                from fedlearn.tracking.mlflow_run import public_uri

                error = error.replace(self.uri, public_uri(self.uri))
            self.error = error
            self.sink = None
            log.warning(
                "MLflow tracking failed (%s): %s; tracking is off for the rest of this "
                "process, the run goes on, and resuming it logs what was missed",
                what,
                self.error,
            )
            with contextlib.suppress(Exception):  # the store's own trouble shows elsewhere
                self.store.add_event("tracking-failed", self.store.committed_round(), self.error)


def start_tracking(
    config: BaseModel, name: str, directory: Path, store: RunStore
) -> Tracking | None:
    """The tracking a run's config asks for (``[tracking] mlflow_uri``), started; None
    when it asks for none."""
    section = getattr(config, "tracking", None)
    if section is None or getattr(section, "mlflow_uri", None) is None:
        return None

    def make() -> MlflowRun:
        from fedlearn.tracking.mlflow_run import MlflowRun

        return MlflowRun(section, name, directory)

    return Tracking(store, make, section.mlflow_uri)


__all__ = ["Tracking", "start_tracking"]
