"""The server's half of a SecAgg+ round as a sans-IO state machine, and its result."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedlearn.errors import (
    ConfigError,
    FedlearnError,
    RoundFailed,
    SecAggError,
    SerializationError,
)
from fedlearn.secagg import crypto, shamir
from fedlearn.secagg.config import CIPHERTEXT_SIZE, MAX_ID, SecAggConfig, Stage, pairwise_sign
from fedlearn.secagg.graph import (
    neighbour_graph,
)
from fedlearn.secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    EncryptedShares,
    MaskedInput,
    PeerKey,
    PeerKeys,
    ServerMessage,
    Setup,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedlearn.secagg.quantize import (
    dequantize,
    error_bound,
)


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """What a finished round reveals: the weighted sum of the survivors' updates."""

    round: int
    weighted_sum: np.ndarray
    """``sum_i w_i clip(x_i)`` over the survivors, float64."""
    total_weight: int
    survivors: frozenset[int]
    """Clients whose input is in the sum (U3)."""
    error_bound: float
    """Per-coordinate bound on ``|weighted_sum - exact|``: ``len(survivors) / 2^(s+1)``."""

    def mean(self) -> np.ndarray:
        """The weighted mean ``weighted_sum / total_weight``."""
        if self.total_weight <= 0:
            raise SecAggError("total weight is zero; there is no mean")
        return self.weighted_sum / float(self.total_weight)


def _prune(live: set[int], graph: Mapping[int, frozenset[int]], threshold: int) -> set[int]:
    """Drop clients with fewer than ``threshold`` live share holders, until none are left."""
    live = set(live)
    changed = True
    while changed:
        changed = False
        for c in sorted(live):
            if len(graph[c] & live) + 1 < threshold:
                live.discard(c)
                changed = True
    return live


class SecAggServer:
    """The server's half of one round. Feed it client messages, call :meth:`advance` at
    each stage's deadline (or once :attr:`waiting_for` is empty), deliver what it returns.

    :meth:`receive` raises :class:`SecAggError` (or :class:`SerializationError`) for a
    message it refuses; a refused message from a client that was expected excludes that
    client from the round (it counts as dropped, which the protocol tolerates). Other
    state is untouched by a refusal. :meth:`advance` raises :class:`RoundFailed` when
    too few clients remain; the round is then aborted and outputs nothing.
    """

    def __init__(self, config: SecAggConfig, round: int) -> None:
        if not isinstance(round, int) or not 0 <= round <= MAX_ID:
            raise ConfigError(f"round must be an int in 0..{MAX_ID}")
        self.config = config
        self.round = round
        self.graph = neighbour_graph(config.clients, config.num_neighbours, config.graph_seed)
        self.stage = Stage.SETUP
        self.rejected: dict[int, str] = {}
        """Clients excluded for a refused message, with the reason."""
        self.members: dict[Stage, frozenset[int]] = {}
        """Clients that completed each stage (after pruning): U1..U4."""
        self._live: set[int] = set(config.clients)
        self._replied: set[int] = set()
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._ciphertexts: dict[int, dict[int, bytes]] = {}
        self._acc: np.ndarray | None = None
        self._requests: dict[int, UnmaskRequest] = {}
        self._b_shares: dict[int, dict[int, shamir.Share]] = {}
        self._sk_shares: dict[int, dict[int, shamir.Share]] = {}
        self._result: SecAggResult | None = None

    # -- public API -------------------------------------------------------------

    @property
    def waiting_for(self) -> frozenset[int]:
        """Clients whose reply to the current stage has not arrived yet."""
        if self.stage in (Stage.SETUP, Stage.DONE, Stage.ABORTED):
            return frozenset()
        return frozenset(self._live - self._replied)

    @property
    def done(self) -> bool:
        return self.stage is Stage.DONE

    def start(self) -> list[Setup]:
        """Stage 0: each selected client gets the config and its neighbour list."""
        if self.stage is not Stage.SETUP:
            raise SecAggError("the round has already started")
        self.stage = Stage.ADVERTISE
        return [
            Setup(self.round, c, self.config, tuple(sorted(self.graph[c])))
            for c in self.config.clients
        ]

    def receive(self, msg: ClientMessage) -> None:
        """Take one client message for the current stage."""
        expected = {
            Stage.ADVERTISE: AdvertiseKeys,
            Stage.SHARE: ShareKeys,
            Stage.MASKED: MaskedInput,
            Stage.UNMASK: UnmaskShares,
        }.get(self.stage)
        if expected is None or not isinstance(msg, expected):
            raise SecAggError(
                f"round {self.round} at stage {self.stage.name} does not take {type(msg).__name__}"
            )
        if msg.round != self.round:
            raise SecAggError(f"message for round {msg.round} sent to round {self.round}")
        c = msg.client_id
        if c not in self._live:
            raise SecAggError(f"client {c} is not (or no longer) in round {self.round}")
        if c in self._replied:
            raise SecAggError(f"client {c} already answered stage {self.stage.name}")
        try:
            if isinstance(msg, AdvertiseKeys):
                self._take_keys(msg)
            elif isinstance(msg, ShareKeys):
                self._take_shares(msg)
            elif isinstance(msg, MaskedInput):
                self._take_masked(msg)
            else:
                self._take_unmask(msg)
        except (SecAggError, SerializationError) as exc:
            self._live.discard(c)
            self.rejected[c] = str(exc)
            raise
        self._replied.add(c)

    def advance(self) -> list[ServerMessage]:
        """Close the current stage: whoever has not replied has dropped out.

        Returns the messages of the next stage (empty when the round is done, see
        :meth:`result`). Raises :class:`RoundFailed` (round aborted) when too few
        clients remain, :class:`SecAggError` when the shares do not reconstruct.
        """
        if self.stage is Stage.ABORTED:
            raise RoundFailed(f"secure aggregation round {self.round} was aborted")
        try:
            if self.stage is Stage.ADVERTISE:
                return list(self._close_advertise())
            if self.stage is Stage.SHARE:
                return list(self._close_share())
            if self.stage is Stage.MASKED:
                return list(self._close_masked())
            if self.stage is Stage.UNMASK:
                self._close_unmask()
                return []
        except FedlearnError:
            self._abort()
            raise
        raise SecAggError(f"nothing to advance at stage {self.stage.name}")

    def result(self) -> SecAggResult:
        """The round's output; only after the final :meth:`advance` succeeded."""
        if self._result is None:
            raise SecAggError(f"round {self.round} has no result (stage {self.stage.name})")
        return self._result

    # -- receiving ------------------------------------------------------------------

    def _take_keys(self, msg: AdvertiseKeys) -> None:
        for key in (msg.c_pk, msg.s_pk):
            if not isinstance(key, bytes) or len(key) != crypto.KEY_SIZE:
                raise SerializationError("an advertised public key must be 32 bytes")
        if msg.c_pk == msg.s_pk:
            raise SecAggError(f"client {msg.client_id} advertised the same key twice")
        seen = {k for pair in self._keys.values() for k in pair}
        if msg.c_pk in seen or msg.s_pk in seen:
            raise SecAggError(f"client {msg.client_id} advertised another client's key")
        self._keys[msg.client_id] = (msg.c_pk, msg.s_pk)

    def _take_shares(self, msg: ShareKeys) -> None:
        c = msg.client_id
        want = self.graph[c] & self.members[Stage.ADVERTISE]
        got = [r for r, _ in msg.ciphertexts]
        if len(set(got)) != len(got) or set(got) != want:
            raise SecAggError(
                f"client {c} sent shares to {sorted(got)}, expected its live neighbours "
                f"{sorted(want)}"
            )
        for r, blob in msg.ciphertexts:
            if not isinstance(blob, bytes) or len(blob) != CIPHERTEXT_SIZE:
                raise SerializationError(
                    f"client {c}: share ciphertext for {r} must be {CIPHERTEXT_SIZE} bytes"
                )
        for r, blob in msg.ciphertexts:
            self._ciphertexts.setdefault(r, {})[c] = blob

    def _take_masked(self, msg: MaskedInput) -> None:
        cfg = self.config
        dtype = crypto.mask_dtype(cfg.modulus_bits)
        arr = msg.masked
        if (
            not isinstance(arr, np.ndarray)
            or arr.dtype != dtype
            or arr.shape != (cfg.vector_length + 1,)
        ):
            raise SerializationError(
                f"client {msg.client_id}: masked input must be ({cfg.vector_length + 1},) {dtype}"
            )
        if cfg.modulus_bits not in (32, 64) and int(arr.max()) >> cfg.modulus_bits:
            raise SerializationError(f"client {msg.client_id}: masked input exceeds the modulus")
        if self._acc is None:
            self._acc = np.zeros(cfg.vector_length + 1, dtype=dtype)
        np.add(self._acc, arr, out=self._acc)  # only the running sum is kept

    def _take_unmask(self, msg: UnmaskShares) -> None:
        c = msg.client_id
        req = self._requests[c]
        parsed: list[tuple[dict[int, dict[int, shamir.Share]], int, shamir.Share]] = []
        for store, pairs, asked, what in (
            (self._b_shares, msg.b_shares, req.b_share_of, "b"),
            (self._sk_shares, msg.sk_shares, req.sk_share_of, "s_sk"),
        ):
            owners = [o for o, _ in pairs]
            if len(set(owners)) != len(owners) or set(owners) != set(asked):
                raise SecAggError(
                    f"client {c} sent {what}-shares of {sorted(owners)}, asked for {sorted(asked)}"
                )
            for owner, raw in pairs:
                share = shamir.Share.from_bytes(raw)
                if share.index != c + 1 or share.threshold != self.config.threshold:
                    raise SecAggError(
                        f"client {c} sent a {what}-share of {owner} that is not its own"
                    )
                parsed.append((store, owner, share))
        for store, owner, share in parsed:
            store.setdefault(owner, {})[c] = share

    # -- closing stages ---------------------------------------------------------------

    def _require(self, live: set[int], what: str) -> None:
        if len(live) < self.config.min_survivors:
            raise RoundFailed(
                f"secure aggregation round {self.round}: only {len(live)} clients left "
                f"after {what}, need {self.config.min_survivors}"
            )

    def _next_stage(self, stage: Stage, members: set[int]) -> None:
        self.members[self.stage] = frozenset(members)
        self._live = set(members)
        self._replied = set()
        self.stage = stage

    def _close_advertise(self) -> Iterable[PeerKeys]:
        live = _prune(self._replied & self._live, self.graph, self.config.threshold)
        self._require(live, "key advertisement")
        self._next_stage(Stage.SHARE, live)
        self._keys = {c: self._keys[c] for c in live}
        for c in sorted(live):
            peers = tuple(PeerKey(v, *self._keys[v]) for v in sorted(self.graph[c] & live))
            yield PeerKeys(self.round, c, peers)

    def _close_share(self) -> Iterable[EncryptedShares]:
        live = _prune(self._replied & self._live, self.graph, self.config.threshold)
        self._require(live, "share distribution")
        self._next_stage(Stage.MASKED, live)
        routed = self._ciphertexts
        self._ciphertexts = {}
        for c in sorted(live):
            inbox = routed.get(c, {})
            cts = tuple((s, inbox[s]) for s in sorted(self.graph[c] & live))
            yield EncryptedShares(self.round, c, cts)

    def _close_masked(self) -> Iterable[UnmaskRequest]:
        u2 = self.members[Stage.SHARE]
        u3 = self._replied & self._live
        self._require(u3, "masked input")
        t = self.config.threshold
        for u in sorted(u2):
            holders = self.graph[u] & u3
            if u in u3 and len(holders) + 1 < t:
                raise RoundFailed(
                    f"secure aggregation round {self.round}: client {u}'s self mask has "
                    f"{len(holders) + 1} live share holders, need {t}"
                )
            if u not in u3 and holders and len(holders) < t:
                raise RoundFailed(
                    f"secure aggregation round {self.round}: dropped client {u}'s masks "
                    f"have {len(holders)} live share holders, need {t}"
                )
        self._next_stage(Stage.UNMASK, u3)
        self._requests = {}
        for c in sorted(u3):
            req = UnmaskRequest(
                self.round,
                c,
                b_share_of=tuple(sorted((self.graph[c] & u3) | {c})),
                sk_share_of=tuple(sorted(self.graph[c] & (u2 - u3))),
            )
            self._requests[c] = req
        yield from self._requests.values()

    def _reconstruct(
        self, store: dict[int, dict[int, shamir.Share]], owner: int, u4: set[int], what: str
    ) -> bytes:
        shares = [s for holder, s in sorted(store.get(owner, {}).items()) if holder in u4]
        if len(shares) < self.config.threshold:
            raise RoundFailed(
                f"secure aggregation round {self.round}: {len(shares)} {what}-shares of "
                f"client {owner} arrived, need {self.config.threshold}"
            )
        try:
            return shamir.combine(shares)
        except SecAggError as exc:
            raise SecAggError(f"{what}-shares of client {owner} do not agree: {exc}") from exc

    def _close_unmask(self) -> None:
        u2 = self.members[Stage.SHARE]
        u3 = self.members[Stage.MASKED]
        u4 = self._replied & self._live
        self._require(u4, "unmasking")
        cfg = self.config
        removals: list[tuple[bytes, int]] = []
        for u in sorted(u3):
            removals.append((self._reconstruct(self._b_shares, u, u4, "b"), -1))
        for u in sorted(u2 - u3):
            peers = self.graph[u] & u3
            if not peers:
                continue
            sk = self._reconstruct(self._sk_shares, u, u4, "s_sk")
            private = crypto.load_private(sk)
            if crypto.public_key_bytes(private) != self._keys[u][1]:
                raise SecAggError(f"reconstructed masking key of client {u} does not match")
            for v in sorted(peers):
                shared = crypto.agree(private, self._keys[v][1])
                seed = crypto.derive_mask_seed(shared, round=self.round, a=u, b=v)
                removals.append((seed, -pairwise_sign(v, u)))
        assert self._acc is not None
        total = crypto.apply_masks(self._acc, removals, cfg.modulus_bits)
        weighted_sum, weight = dequantize(
            total, scale_bits=cfg.scale_bits, modulus_bits=cfg.modulus_bits
        )
        self._next_stage(Stage.DONE, u4)
        self._acc = None
        self._b_shares = {}
        self._sk_shares = {}
        self._result = SecAggResult(
            round=self.round,
            weighted_sum=weighted_sum,
            total_weight=weight,
            survivors=u3,
            error_bound=error_bound(len(u3), cfg.scale_bits),
        )

    def _abort(self) -> None:
        self.stage = Stage.ABORTED
        self._live = set()
        self._acc = None
        self._ciphertexts = {}
        self._b_shares = {}
        self._sk_shares = {}
        self._result = None
