"""Generated code of the Open Inference Protocol v2 gRPC API (package ``inference``).

``grpc_predict_v2_pb2`` (messages) and ``grpc_predict_v2_pb2_grpc`` (stub and servicer)
are generated from ``grpc_predict_v2.proto`` by ``scripts/gen_proto.sh``; never edit
them by hand. The messages live in protobuf's default pool under their upstream names
(``inference.ModelInferRequest``, ...), so this package cannot be imported in the same
process as another copy of the same API (tritonclient.grpc's generated code).
"""
