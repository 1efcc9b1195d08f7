#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code of the Open Inference Protocol v2 endpoint
# in fedlearn/serving/oip from fedlearn/serving/oip/grpc_predict_v2.proto.
#
# Usage: scripts/gen_oip_proto.sh
#
# Same generator as scripts/gen_proto.sh, pinned to grpcio-tools 1.81.x: its code runs on
# protobuf 6.33 (which flwr 1.42 in the test extra needs) and on 7.x, whereas code from
# grpcio-tools 1.85 requires protobuf >= 7.35. It is installed into a throwaway venv
# (GEN_VENV, default /tmp/gen-venv) so the project's own environment is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."

GEN_VENV="${GEN_VENV:-/tmp/gen-venv}"
TOOLS_SPEC="grpcio-tools==1.81.*"
OUT=fedlearn/serving/oip
PROTO=grpc_predict_v2

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
  "$OUT/$PROTO.proto"

# protoc writes a top-level import (`import grpc_predict_v2_pb2 as grpc__predict__v2__pb2`)
# into the gRPC module; make it an absolute import from the package.
grpc_module="$OUT/${PROTO}_pb2_grpc.py"
sed -i "s/^import ${PROTO}_pb2 as \(.*\)$/from fedlearn.serving.oip import ${PROTO}_pb2 as \1/" \
  "$grpc_module"
grep -q "^from fedlearn.serving.oip import ${PROTO}_pb2 as " "$grpc_module" || {
  echo "gen_oip_proto.sh: could not rewrite the import in $grpc_module" >&2
  exit 1
}
echo "generated $OUT/${PROTO}_pb2.py, $OUT/${PROTO}_pb2.pyi, $grpc_module" \
  "with grpcio-tools $("$GEN_VENV/bin/python" -c 'from importlib.metadata import version; print(version("grpcio-tools"))')"
