#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code in fedlearn/wire from fedlearn/wire/fedlearn.proto.
#
# Usage: scripts/gen_proto.sh
#
# The generator is pinned to grpcio-tools 1.81.x: its code runs on protobuf 6.33 (which flwr
# 1.42 in the test extra needs) and on 7.x, whereas code from grpcio-tools 1.85 requires
# protobuf >= 7.35. It is installed into a throwaway venv (GEN_VENV, default /tmp/gen-venv)
# so the project's own environment is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."

GEN_VENV="${GEN_VENV:-/tmp/gen-venv}"
TOOLS_SPEC="grpcio-tools==1.81.*"
OUT=fedlearn/wire

if ! "$GEN_VENV/bin/python" -c 'import grpc_tools, sys
from importlib.metadata import version
sys.exit(0 if version("grpcio-tools").startswith("1.81.") else 1)' 2>/dev/null; then
  python3 -m venv "$GEN_VENV"
  "$GEN_VENV/bin/python" -m pip install -q "$TOOLS_SPEC"
fi

"$GEN_VENV/bin/python" -m grpc_tools.protoc \
  -I "$OUT" \
  --python_out="$OUT" \
  --pyi_out="$OUT" \
  --grpc_python_out="$OUT" \
  "$OUT/fedlearn.proto"

# protoc writes a top-level import (`import fedlearn_pb2 as fedlearn__pb2`) into the gRPC
# module, whose stub and server registration use only `fedlearn__pb2.ClientMessage` and
# `.ServerMessage` (their SerializeToString and FromString). Point it at
# fedlearn.wire.codec, which has those with a copy-free path for chunk messages and the same
# bytes on the wire (see that module).
grpc_module="$OUT/fedlearn_pb2_grpc.py"
sed -i 's/^import fedlearn_pb2 as fedlearn__pb2$/from fedlearn.wire import codec as fedlearn__pb2/' \
  "$grpc_module"
grep -q '^from fedlearn.wire import codec as fedlearn__pb2$' "$grpc_module" || {
  echo "gen_proto.sh: could not rewrite the import in $grpc_module" >&2
  exit 1
}
echo "generated $OUT/fedlearn_pb2.py, $OUT/fedlearn_pb2.pyi, $grpc_module" \
  "with grpcio-tools $("$GEN_VENV/bin/python" -c 'from importlib.metadata import version; print(version("grpcio-tools"))')"
