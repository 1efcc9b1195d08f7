"""A client's half of a SecAgg+ round as a sans-IO state machine."""

from __future__ import annotations

import secrets

import numpy as np

from fedlearn.errors import (
    ConfigError,
    FedlearnError,
    SecAggError,
    SerializationError,
    UpdateRejected,
)
from fedlearn.privacy.distributed import noised_integers
from fedlearn.secagg import crypto, shamir
from fedlearn.secagg.config import (
    MAX_ID,
    PLAINTEXT_SIZE,
    SHARE_PLAIN,
    SecAggConfig,
    Stage,
    pairwise_sign,
)
from fedlearn.secagg.graph import (
    neighbours_of,
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
    encode_integers,
    quantize,
)


class SecAggClient:
    """One client's half of a round. :meth:`handle` each server message, send the reply.

    Call :meth:`set_input` with the flat update and its weight before the
    :class:`EncryptedShares` message arrives. Any message the client refuses raises
    :class:`SecAggError` (or :class:`SerializationError`) and aborts the client: it
    forgets its secrets and answers nothing more, which the server sees as a dropout.
    """

    def __init__(self, client_id: int, *, round: int | None = None) -> None:
        if not isinstance(client_id, int) or not 0 <= client_id <= MAX_ID:
            raise ConfigError(f"client id must be an int in 0..{MAX_ID}")
        self.client_id = client_id
        self.expected_round = round
        self.stage = Stage.SETUP
        self.round = -1
        self.config: SecAggConfig | None = None
        self.neighbours: frozenset[int] = frozenset()
        self._input: tuple[np.ndarray, int] | None = None
        self._c: crypto.KeyPair | None = None
        self._s: crypto.KeyPair | None = None
        self._b: bytes | None = None
        self._peers: dict[int, PeerKey] = {}
        self._share_keys: dict[int, bytes] = {}
        self._own_sk_share: shamir.Share | None = None
        self._own_b_share: shamir.Share | None = None
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        """owner -> (s_sk-share, b-share) this client holds for that neighbour."""

    def set_input(self, vector: np.ndarray, weight: int) -> None:
        """The flat float update to aggregate and its weight (``num_examples``)."""
        if self.stage > Stage.SHARE:
            raise SecAggError("the input can no longer change in this round")
        vec = np.asarray(vector)
        if vec.ndim != 1 or vec.dtype.kind != "f":
            raise UpdateRejected("secure aggregation needs a flat float vector")
        if not isinstance(weight, int | np.integer) or isinstance(weight, bool) or weight < 0:
            raise UpdateRejected(f"weight must be a non-negative int, got {weight!r}")
        self._input = (vec, int(weight))

    def handle(self, msg: ServerMessage) -> ClientMessage:
        """Answer one server message (raises and aborts on anything inconsistent)."""
        try:
            if isinstance(msg, Setup):
                return self._on_setup(msg)
            if isinstance(msg, PeerKeys):
                return self._on_peer_keys(msg)
            if isinstance(msg, EncryptedShares):
                return self._on_shares(msg)
            if isinstance(msg, UnmaskRequest):
                return self._on_unmask(msg)
            raise SecAggError(f"a client does not take {type(msg).__name__}")
        except (FedlearnError, ValueError) as exc:
            self.abort()
            if isinstance(exc, FedlearnError):
                raise
            raise SecAggError(str(exc)) from exc

    def abort(self) -> None:
        """Forget every secret of this round and refuse further messages."""
        self.stage = Stage.ABORTED
        self._input = None
        self._c = self._s = None
        self._b = None
        self._share_keys = {}
        self._own_sk_share = self._own_b_share = None
        self._held = {}

    # -- stages -----------------------------------------------------------------------

    def _expect(self, stage: Stage, what: str) -> None:
        if self.stage is not stage:
            raise SecAggError(f"client {self.client_id} got {what} at stage {self.stage.name}")

    def _check_envelope(self, msg: ServerMessage) -> None:
        if msg.client_id != self.client_id:
            raise SecAggError(f"message for client {msg.client_id} reached {self.client_id}")
        if msg.round != self.round:
            raise SecAggError(f"message for round {msg.round} during round {self.round}")

    def _on_setup(self, msg: Setup) -> AdvertiseKeys:
        self._expect(Stage.SETUP, "Setup")
        if msg.client_id != self.client_id:
            raise SecAggError(f"setup for client {msg.client_id} reached {self.client_id}")
        if self.expected_round is not None and msg.round != self.expected_round:
            raise SecAggError(f"setup for round {msg.round}, expected {self.expected_round}")
        cfg = msg.config
        if self.client_id not in cfg.clients:
            raise SecAggError(f"client {self.client_id} is not among the round's clients")
        mine = neighbours_of(cfg.clients, cfg.num_neighbours, cfg.graph_seed, self.client_id)
        if len(set(msg.neighbours)) != len(msg.neighbours) or set(msg.neighbours) != mine:
            raise SecAggError(
                f"client {self.client_id}: the neighbour list from the server does not "
                "match the round's public graph"
            )
        self.round = msg.round
        self.config = cfg
        self.neighbours = mine
        self._c = crypto.generate_keypair()
        self._s = crypto.generate_keypair()
        self._b = secrets.token_bytes(crypto.KEY_SIZE)
        self.stage = Stage.ADVERTISE
        return AdvertiseKeys(self.round, self.client_id, self._c.public, self._s.public)

    def _on_peer_keys(self, msg: PeerKeys) -> ShareKeys:
        self._expect(Stage.ADVERTISE, "PeerKeys")
        self._check_envelope(msg)
        cfg, c, s, b = self.config, self._c, self._s, self._b
        assert cfg is not None and c is not None and s is not None and b is not None
        me = self.client_id
        ids = [p.client_id for p in msg.peers]
        if len(set(ids)) != len(ids):
            raise SecAggError(f"client {me}: a peer appears twice in the key list")
        strangers = set(ids) - self.neighbours
        if strangers:
            raise SecAggError(f"client {me}: keys of non-neighbours {sorted(strangers)}")
        if len(ids) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {me}: only {len(ids)} neighbours left, cannot share {cfg.threshold}"
                "-out-of-n"
            )
        keys = [k for p in msg.peers for k in (p.c_pk, p.s_pk)] + [c.public, s.public]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"client {me}: public keys in the round are not distinct")
        self._peers = {p.client_id: p for p in msg.peers}
        holders = [*sorted(ids), me]
        indices = [h + 1 for h in holders]
        sk_shares = shamir.split(s.private_bytes(), cfg.threshold, indices)
        b_shares = shamir.split(b, cfg.threshold, indices)
        out = []
        for holder, sk_share, b_share in zip(holders, sk_shares, b_shares, strict=True):
            if holder == me:
                self._own_sk_share, self._own_b_share = sk_share, b_share
                continue
            shared = crypto.agree(c.private, self._peers[holder].c_pk)
            key = crypto.derive_share_key(shared, round=self.round, a=me, b=holder)
            self._share_keys[holder] = key
            plain = SHARE_PLAIN.pack(me, holder) + sk_share.to_bytes() + b_share.to_bytes()
            blob = crypto.encrypt(key, plain, sender=me, receiver=holder, round=self.round)
            out.append((holder, blob))
        self._c = None  # the share keys are derived; the private key is no longer needed
        self.stage = Stage.SHARE
        return ShareKeys(self.round, me, tuple(out))

    def _on_shares(self, msg: EncryptedShares) -> MaskedInput:
        self._expect(Stage.SHARE, "EncryptedShares")
        self._check_envelope(msg)
        cfg, s, b = self.config, self._s, self._b
        assert cfg is not None and s is not None and b is not None
        me = self.client_id
        if self._input is None:
            raise SecAggError(f"client {me}: set_input() was not called before masking")
        senders = [sender for sender, _ in msg.ciphertexts]
        if len(set(senders)) != len(senders):
            raise SecAggError(f"client {me}: a sender appears twice among the shares")
        strangers = set(senders) - set(self._peers)
        if strangers:
            raise SecAggError(
                f"client {me}: shares from clients that are not live neighbours {sorted(strangers)}"
            )
        if len(senders) + 1 < cfg.threshold:
            raise SecAggError(f"client {me}: only {len(senders)} neighbours left to mask with")
        held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        for sender, blob in msg.ciphertexts:
            plain = crypto.decrypt(
                self._share_keys[sender], blob, sender=sender, receiver=me, round=self.round
            )
            if len(plain) != PLAINTEXT_SIZE:
                raise SerializationError(f"client {me}: share bundle from {sender} is malformed")
            owner, holder = SHARE_PLAIN.unpack_from(plain)
            if owner != sender or holder != me:
                raise SecAggError(f"client {me}: share bundle from {sender} is misaddressed")
            off = SHARE_PLAIN.size
            sk_share = shamir.Share.from_bytes(plain[off : off + shamir.SHARE_SIZE])
            b_share = shamir.Share.from_bytes(plain[off + shamir.SHARE_SIZE :])
            for share in (sk_share, b_share):
                if share.index != me + 1 or share.threshold != cfg.threshold:
                    raise SecAggError(f"client {me}: share from {sender} has the wrong index")
            held[sender] = (sk_share, b_share)
        vector, weight = self._input
        if vector.shape != (cfg.vector_length,):
            raise UpdateRejected(
                f"client {me}: update has {vector.size} values, the round expects "
                f"{cfg.vector_length}"
            )
        if weight > cfg.max_weight and cfg.noise is None:  # under DP every weight is 1
            raise UpdateRejected(f"client {me}: weight {weight} exceeds {cfg.max_weight}")
        masks = [(b, 1)]
        for v in sorted(held):
            shared = crypto.agree(s.private, self._peers[v].s_pk)
            seed = crypto.derive_mask_seed(shared, round=self.round, a=me, b=v)
            masks.append((seed, pairwise_sign(me, v)))
        noise = cfg.round_noise
        if noise is not None and cfg.noise is not None:
            # distributed DP: L2 clip, conditional rounding and this client's noise share
            # go in before any mask; the weight is 1 (the sum's sensitivity is one clip)
            values = noised_integers(vector, noise, cfg.noise.source(self.round, me))
            masked = encode_integers(values, 1, modulus_bits=cfg.modulus_bits, masks=masks)
        else:
            masked = quantize(
                vector,
                weight,
                clip=cfg.clip,
                scale_bits=cfg.scale_bits,
                modulus_bits=cfg.modulus_bits,
                masks=masks,
            )
        self._held = held
        self._input = None
        self._s = None
        self._b = None
        self._share_keys = {}
        self.stage = Stage.MASKED
        return MaskedInput(self.round, me, masked)

    def _on_unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        self._expect(Stage.MASKED, "UnmaskRequest")
        self._check_envelope(msg)
        cfg = self.config
        own_sk, own_b = self._own_sk_share, self._own_b_share
        assert cfg is not None and own_sk is not None and own_b is not None
        me = self.client_id
        b_of, sk_of = list(msg.b_share_of), list(msg.sk_share_of)
        if len(set(b_of)) != len(b_of) or len(set(sk_of)) != len(sk_of):
            raise SecAggError(f"client {me}: unmask request repeats a peer")
        both = set(b_of) & set(sk_of)
        if both:
            raise SecAggError(
                f"client {me}: unmask request asks for both shares of {sorted(both)}; refused"
            )
        if me not in b_of:
            raise SecAggError(f"client {me}: unmask request treats this client as dropped")
        partners = set(self._held) | {me}
        if set(b_of) | set(sk_of) != partners:
            raise SecAggError(
                f"client {me}: unmask request names {sorted(set(b_of) | set(sk_of))}, but "
                f"this client holds shares of {sorted(partners)}"
            )
        if len(b_of) < cfg.threshold:
            raise SecAggError(
                f"client {me}: only {len(b_of)} survivors in the neighbourhood, fewer than "
                f"t = {cfg.threshold}; refusing to reveal shares"
            )
        b_out = []
        for owner in sorted(b_of):
            share = own_b if owner == me else self._held[owner][1]
            b_out.append((owner, share.to_bytes()))
        sk_out = [(owner, self._held[owner][0].to_bytes()) for owner in sorted(sk_of)]
        self.abort()
        self.stage = Stage.DONE
        return UnmaskShares(self.round, me, tuple(b_out), tuple(sk_out))
