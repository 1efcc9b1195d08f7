"""Secure aggregation: SecAgg+ (Bell et al. 2020) as sans-IO state machines, semi-honest server.

* :mod:`~fedlearn.secagg.shamir` - t-of-n Shamir sharing of 32-byte secrets;
* :mod:`~fedlearn.secagg.crypto` - X25519, HKDF-SHA256, ChaCha20-Poly1305, ChaCha20 masks;
* :mod:`~fedlearn.secagg.quantize` - clipping, fixed point, weights, capacity check;
* :mod:`~fedlearn.secagg.graph` - the seeded ``k``-regular neighbour graph;
* :mod:`~fedlearn.secagg.config` - a round's public parameters and stages;
* :mod:`~fedlearn.secagg.messages` - the messages and their byte codec;
* :mod:`~fedlearn.secagg.server`, :mod:`~fedlearn.secagg.client` - the two state machines;
* :mod:`~fedlearn.secagg.simulate` - an in-memory driver with dropout injection;
* :mod:`~fedlearn.secagg.stages` - the glue into a coordinator round.

With distributed DP (:mod:`fedlearn.privacy.distributed`, ``SecAggConfig.noise``) each
client clips, rounds and adds its Skellam share in the quantized domain before masking,
so the sum the server unmasks is already noised.

The server and every client exchange the frozen dataclasses of ``messages`` and nothing
else: no sockets, threads, sleeps or clocks. A driver (a transport, or
:mod:`fedlearn.secagg.simulate`) moves messages and decides when a stage's deadline has
passed by calling :meth:`SecAggServer.advance`; a client that has not answered by then
has dropped out.

Stages (server side; ``U0 ⊇ U1 ⊇ U2 ⊇ U3 ⊇ U4`` are the clients still in)::

    start()   -> Setup            to U0  (config + the client's neighbours)
    ADVERTISE <- AdvertiseKeys    c_pk (share encryption), s_pk (masking)       => U1
              -> PeerKeys         to each of U1: its neighbours' keys in U1
    SHARE     <- ShareKeys        per neighbour: AEAD(shares of s_sk and of b)    => U2
              -> EncryptedShares  to each of U2: ciphertexts from neighbours in U2
    MASKED    <- MaskedInput      q(w*x) ++ [w] + b-mask + sum(+-pairwise masks)  => U3
              -> UnmaskRequest    to each of U3: b-shares of neighbours in U3 (and its
                                  own), s_sk-shares of neighbours in U2 \\ U3
    UNMASK    <- UnmaskShares                                                    => U4
              -> result: sum over U3 of w*x, sum over U3 of w

Every client shares its two secrets ``t``-of-``(d + 1)`` among its ``d`` live neighbours
and itself (share index = holder id + 1). After each stage the server prunes clients
whose live neighbourhood (plus themselves) is smaller than ``t`` - they could never be
unmasked - and aborts with :class:`RoundFailed` when fewer than ``min_survivors`` remain
or some needed secret has fewer than ``t`` live holders. An aborted round outputs
nothing. The server keeps only the running modular sum of masked inputs, never an
individual input. A client reveals, per peer, the b-share or the s_sk-share, never both,
and only for a request that partitions exactly the peers it exchanged shares with.
"""

from fedlearn.secagg.client import SecAggClient
from fedlearn.secagg.config import SecAggConfig, Stage
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
    decode_message,
    encode_message,
)
from fedlearn.secagg.quantize import ArraySpec, flatten, unflatten
from fedlearn.secagg.server import SecAggResult, SecAggServer
from fedlearn.secagg.simulate import SecAggSimulation, run_secure_sum

__all__ = [
    "AdvertiseKeys",
    "ArraySpec",
    "ClientMessage",
    "EncryptedShares",
    "MaskedInput",
    "PeerKey",
    "PeerKeys",
    "SecAggClient",
    "SecAggConfig",
    "SecAggResult",
    "SecAggServer",
    "SecAggSimulation",
    "ServerMessage",
    "Setup",
    "ShareKeys",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "decode_message",
    "encode_message",
    "flatten",
    "run_secure_sum",
    "unflatten",
]
