"""The live run page: an event bus the run emits to (:mod:`fedlearn.ui.events`, no
dependencies), the page's own process that the events go to (:mod:`fedlearn.ui.page`,
:mod:`fedlearn.ui.child`) and the Starlette app it serves (:mod:`fedlearn.ui.app`, the
``serve`` extra; imported only in that process)."""

from fedlearn.ui.events import Event, EventBus

__all__ = ["Event", "EventBus"]
