"""The deployment wire layer: protobuf schema, record conversion and payload chunking.

* ``fedlearn.proto`` is the schema (package ``fedlearn.v1``); ``fedlearn_pb2``,
  ``fedlearn_pb2.pyi`` and ``fedlearn_pb2_grpc`` are generated from it by
  ``scripts/gen_proto.sh`` and committed. Do not edit them by hand.
* :mod:`fedlearn.wire.convert` turns tasks, replies, config and metrics into protobuf
  headers and back.
* :mod:`fedlearn.wire.chunks` splits a payload into chunks below gRPC's default 4 MiB
  message limit and reassembles them with size, order and SHA-256 checks.

Nothing here opens a socket; the coordinator daemon and the site client build on it.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
"""The wire protocol version sent in ``Hello`` and ``Challenge``."""

__all__ = ["PROTOCOL_VERSION"]
