#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code:
#   fedlearn/wire/fedlearn.proto                  -> fedlearn/wire/fedlearn_pb2*        (deployment)
#   fedlearn/serving/oip/grpc_predict_v2.proto    -> fedlearn/serving/oip/grpc_predict_v2_pb2*  (OIP v2)
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

if ! "$GEN_VENV/bin/python" -c 'import grpc_tools, sys
from importlib.metadata import version
sys.exit(0 if version("grpcio-tools").startswith("1.81.") else 1)' 2>/dev/null; then
  python3 -m venv "$GEN_VENV"
  "$GEN_VENV/bin/python" -m pip install -q "$TOOLS_SPEC"
fi

# generate DIR NAME IMPORT: protoc DIR/NAME.proto, then replace the gRPC module's top-level
# `import NAME_pb2 as ALIAS` (which only works from inside DIR) with `IMPORT as ALIAS`.
generate() {
  local dir=$1 name=$2 import=$3
  "$GEN_VENV/bin/python" -m grpc_tools.protoc \
    -I "$dir" --python_out="$dir" --pyi_out="$dir" --grpc_python_out="$dir" "$dir/$name.proto"
  local grpc_module="$dir/${name}_pb2_grpc.py"
  sed -i "s/^import ${name}_pb2 as \(.*\)$/${import} as \1/" "$grpc_module"
  grep -q "^${import} as " "$grpc_module" || {
    echo "gen_proto.sh: could not rewrite the import in $grpc_module" >&2
    exit 1
  }
  echo "generated $dir/${name}_pb2.py, $dir/${name}_pb2.pyi, $grpc_module"
}

# The deployment's gRPC module uses only `ClientMessage` and `ServerMessage` (their
# SerializeToString and FromString): fedlearn.wire.codec has those, with a copy-free path
# for chunk messages and the same bytes on the wire.
generate fedlearn/wire fedlearn "from fedlearn.wire import codec"
generate fedlearn/serving/oip grpc_predict_v2 "from fedlearn.serving.oip import grpc_predict_v2_pb2"
echo "with grpcio-tools $("$GEN_VENV/bin/python" -c 'from importlib.metadata import version; print(version("grpcio-tools"))')"
