"""Limits on streams that have not joined yet, per network address.

Before its Welcome a stream is anyone's: it costs the coordinator a worker thread for up
to the join deadline, and its Hello a challenge. :class:`JoinGate` bounds both per peer
address (``context.peer()`` without the port; IPv6 addresses by their /64, which one
host usually holds whole) and in all:

* joins in progress: at most ``per_peer`` streams from one address, and ``total`` from
  all, between the stream's start and the join's outcome;
* rate: a token bucket per address, ``rate_per_s`` new streams a second in bursts of up to
  ``burst``.

A stream over a limit is refused at once with RESOURCE_EXHAUSTED (a site retries it
with backoff), before anything is read from it. What the gate cannot do is tell an
attacker from a site at the same address; what keeps such a site's join safe is that its
challenge belongs to its own stream (fedlearn.security.auth): no Hello on another stream
can take it away, so a flood can only delay a site that shares its address, by taking
the join slots, never make its join fail once it has started.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class JoinLimits:
    """How many joins may be in progress, and how fast they may start."""

    per_peer: int = 32
    total: int = 256
    rate_per_s: float = 50.0
    burst: int = 100


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string that limits are counted by:
    ``ipv4:10.0.0.7:5123`` -> ``10.0.0.7``; ``ipv6:[2001:db8::5]:5123`` (or its
    %-encoded form) -> ``2001:db8::/64``; ``::1`` stays itself; anything else whole."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = unquote(rest).rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and not address.is_loopback:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclass
class _Peer:
    tokens: float
    updated: float
    joining: int = 0


class JoinGate:
    """Thread-safe admission of new streams: :meth:`enter` at a stream's start,
    :meth:`leave` once its join is decided."""

    def __init__(self, limits: JoinLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._joining = 0
        self._lock = threading.Lock()
        self.refused = 0

    def enter(self, peer: str) -> str | None:
        """Count a new stream from ``peer`` (a :func:`peer_address`): None if it may go on,
        else why it is refused (it is then not counted)."""
        limits = self.limits
        with self._lock:
            now = self._clock()
            state = self._peers.get(peer)
            if state is None:
                if len(self._peers) >= 4 * limits.total:
                    self._forget_idle()
                state = self._peers[peer] = _Peer(float(limits.burst), now)
            state.tokens = min(
                float(limits.burst), state.tokens + (now - state.updated) * limits.rate_per_s
            )
            state.updated = now
            reason = None
            if state.joining >= limits.per_peer:
                reason = f"{state.joining} joins from {peer} are already in progress"
            elif self._joining >= limits.total:
                reason = f"{self._joining} joins are already in progress"
            elif state.tokens < 1.0:
                reason = f"joins from {peer} arrive faster than {limits.rate_per_s:g} a second"
            if reason is not None:
                self.refused += 1
                return f"{reason}; try again later"
            state.tokens -= 1.0
            state.joining += 1
            self._joining += 1
            return None

    def leave(self, peer: str) -> None:
        """A stream counted by :meth:`enter` has joined, been refused, or ended."""
        with self._lock:
            state = self._peers.get(peer)
            if state is None or state.joining == 0:  # pragma: no cover - unbalanced call
                return
            state.joining -= 1
            self._joining -= 1

    @property
    def joining(self) -> int:
        """Joins in progress, all addresses together."""
        with self._lock:
            return self._joining

    def _forget_idle(self) -> None:
        """Drop addresses with no join in progress (their buckets restart full: lenient,
        but bounded memory whatever the number of addresses)."""
        for peer in [p for p, s in self._peers.items() if s.joining == 0]:
            del self._peers[peer]
