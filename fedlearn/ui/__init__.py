"""The live run page: an event bus the run emits to (:mod:`fedlearn.ui.events`, no
dependencies) and a Starlette app that shows the run in a browser
(:mod:`fedlearn.ui.app`, the ``serve`` extra; imported only when a page is served)."""

from fedlearn.ui.events import Event, EventBus

__all__ = ["Event", "EventBus"]
