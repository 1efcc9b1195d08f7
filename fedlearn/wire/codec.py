"""The gRPC serializers of the ``Connect`` stream, used by the generated ``fedlearn_pb2_grpc``.

``scripts/gen_proto.sh`` points the generated gRPC module at this module instead of
``fedlearn_pb2``, so its stub and its server registration (de)serialize through
:class:`ClientMessage` and :class:`ServerMessage` below:

* sending, a message may be a protobuf message (serialized as usual) or the bytes of an
  already serialized one (:func:`fedlearn.wire.chunks.frames`, which writes chunk messages
  with a single copy of their data), passed through as they are;
* receiving, a message holding one chunk is read by :func:`~fedlearn.wire.chunks.
  parse_chunk_message` (its data a view of the received bytes, not two protobuf copies);
  every other message, and any encoding that fast path leaves alone, is parsed by protobuf.

The bytes on the wire are protobuf's either way; a peer may use plain protobuf.
"""

from __future__ import annotations

from typing import Any

from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire.chunks import ChunkMessage, parse_chunk_message


def serialize(message: Any) -> bytes:
    """A protobuf message's serialization, or already serialized bytes as they are."""
    if isinstance(message, bytes):
        return message
    return bytes(message.SerializeToString())


class ClientMessage:
    """(De)serializer of ``fedlearn.v1.ClientMessage`` (what sites send)."""

    SerializeToString = staticmethod(serialize)

    @staticmethod
    def FromString(raw: bytes) -> pb.ClientMessage | ChunkMessage:  # noqa: N802 - protobuf's name
        """A chunk message (data not copied) or the protobuf ``ClientMessage``."""
        return parse_chunk_message(raw) or pb.ClientMessage.FromString(raw)


class ServerMessage:
    """(De)serializer of ``fedlearn.v1.ServerMessage`` (what the coordinator sends)."""

    SerializeToString = staticmethod(serialize)

    @staticmethod
    def FromString(raw: bytes) -> pb.ServerMessage | ChunkMessage:  # noqa: N802 - protobuf's name
        """A chunk message (data not copied) or the protobuf ``ServerMessage``."""
        return parse_chunk_message(raw) or pb.ServerMessage.FromString(raw)
