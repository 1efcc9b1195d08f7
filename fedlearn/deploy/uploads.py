"""One budget for the bytes of every upload in flight, across all sites.

A site's upload is limited on its own (the transport's expected size for its task, the
servicer's ``max_payload``), and its buffer grows with the bytes that arrive
(:class:`fedlearn.wire.chunks.Assembler`). What that does not bound is the total: a
thousand sites, honest or not, each sending an upload at once. :class:`UploadBudget`
bounds it. Each upload has an :class:`Account`; before a chunk is buffered the upload
charges its size, and everything it holds is given back when the upload ends (complete,
refused, abandoned at the stage deadline, or its site gone).

A chunk that would take the total over the limit **waits**: its stream is not read
meanwhile, so gRPC's flow control holds the rest of that upload on the site's side, and
the upload goes on once others have ended. Nothing is refused for being over the budget.
Waiters go in arrival order, and the first of them may go over the limit (it holds the
*overdraft*) until its upload ends: uploads that together exceed the budget can never
wait for each other forever, and memory stays within the limit plus one upload. Only
bytes that arrived are charged, so a site that declares a large payload and sends a few
bytes holds a few bytes, and cannot keep honest sites waiting.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fedlearn.errors import ConfigError

WAIT_POLL_S = 0.5
"""How often a waiting upload checks whether it is still wanted (besides being woken)."""


@dataclass(eq=False)
class Account:
    """What one upload holds of the budget."""

    held: int = 0
    closed: bool = False


class UploadBudget:
    """The bytes all uploads in flight may hold together (module docstring). Thread-safe."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"the in-flight upload budget must be a positive int, not {limit!r}")
        self.limit = limit
        self.used = 0
        """Bytes held by the uploads in flight."""
        self.peak = 0
        """Most bytes ever held at once."""
        self.waits = 0
        """Chunks that had to wait for the budget."""
        self._cond = threading.Condition()
        self._waiting: deque[Account] = deque()
        self._overdraft: Account | None = None

    def open(self) -> Account:
        """An account for a new upload (it holds nothing yet)."""
        return Account()

    def charge(self, account: Account, size: int, gone: Callable[[], bool]) -> bool:
        """Hold ``size`` more bytes for ``account``, waiting while the budget is spent.

        Returns False, holding nothing more, if the upload ended while it waited (its
        account was released, or ``gone()`` says so: its site left, its task settled).
        """
        with self._cond:
            if account.closed:
                return False
            if not self._fits(account, size):
                self.waits += 1
                self._waiting.append(account)
                try:
                    while not self._fits(account, size):
                        if account.closed or gone():
                            return False
                        if self._overdraft is None and self._waiting[0] is account:
                            self._overdraft = account  # the first waiter always goes on
                            break
                        self._cond.wait(WAIT_POLL_S)
                finally:
                    self._waiting.remove(account)
                    self._cond.notify_all()  # the next waiter is first now
            account.held += size
            self.used += size
            self.peak = max(self.peak, self.used)
            return True

    def _fits(self, account: Account, size: int) -> bool:
        if account is self._overdraft:
            return True
        first = not self._waiting or self._waiting[0] is account  # no overtaking
        return first and self.used + size <= self.limit

    def release(self, account: Account) -> None:
        """Give back everything ``account`` holds; it can charge nothing more. Idempotent."""
        with self._cond:
            if account.closed:
                return
            account.closed = True
            self.used -= account.held
            account.held = 0
            if self._overdraft is account:
                self._overdraft = None
            self._cond.notify_all()
