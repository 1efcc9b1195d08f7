"""Secure aggregation (SecAgg+, Bell et al. 2020) as a sans-IO core.

* :mod:`~fedlearn.secagg.shamir` - t-of-n Shamir sharing of 32-byte secrets;
* :mod:`~fedlearn.secagg.crypto` - X25519, HKDF-SHA256, ChaCha20-Poly1305, ChaCha20 masks;
* :mod:`~fedlearn.secagg.quantize` - clipping, fixed point, weights, capacity check;
* :mod:`~fedlearn.secagg.graph` - the seeded ``k``-regular neighbour graph;
* :mod:`~fedlearn.secagg.protocol` - messages and the client/server state machines;
* :mod:`~fedlearn.secagg.simulate` - an in-memory driver with dropout injection.
"""

from fedlearn.secagg.protocol import (
    AdvertiseKeys,
    ClientMessage,
    EncryptedShares,
    MaskedInput,
    PeerKey,
    PeerKeys,
    SecAggClient,
    SecAggConfig,
    SecAggResult,
    SecAggServer,
    ServerMessage,
    Setup,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
    encode_message,
)
from fedlearn.secagg.quantize import ArraySpec, flatten, unflatten
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
