"""The deployment wire layer: protobuf schema, record conversion and payload chunking.

* ``fedlearn.proto`` is the schema (package ``fedlearn.v1``); ``fedlearn_pb2``,
  ``fedlearn_pb2.pyi`` and ``fedlearn_pb2_grpc`` are generated from it by
  ``scripts/gen_proto.sh`` and committed. Do not edit them by hand.
* :mod:`fedlearn.wire.convert` turns tasks, replies, config and metrics into protobuf
  headers and back.
* :mod:`fedlearn.wire.chunks` splits a payload into chunks below gRPC's default 4 MiB
  message limit and reassembles them with size, order and SHA-256 checks;
  :mod:`fedlearn.wire.codec` is what the generated gRPC module (de)serializes with (chunk
  messages written and read without protobuf's copies, the same bytes on the wire).

Nothing here opens a socket; the coordinator daemon and the site client build on it.
"""

from __future__ import annotations

PROTOCOL_VERSION = 3
"""The wire protocol version sent in ``Hello`` and ``Challenge``. Version 2 carries a
payload's SHA-256 on its last chunk instead of in the header; version 3 signs the join
transcript ``fedlearn-join-v2``, which covers the coordinator's TLS certificate
(fedlearn.security.auth), so a site of version 2 cannot join a coordinator of version 3
or the reverse: the coordinator refuses it with FAILED_PRECONDITION and both versions."""

CAPABILITIES = ("chunked-arrays", "sha256")
"""What this side of the protocol can do, announced in ``Hello`` and ``Challenge``."""

__all__ = ["CAPABILITIES", "PROTOCOL_VERSION"]
