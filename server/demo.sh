#!/usr/bin/env bash
# A whole deployment on this machine: dev PKI, 3 site keys, allowlist, a TLS coordinator and
# 3 site daemons on 127.0.0.1. Run from the repository root after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
rm -rf server/pki server/state server/sites.toml clients/site-*.key clients/site-*.toml
$bin/fedlearn certs dev --out server/pki >/dev/null
for i in 0 1 2; do
  $bin/fedlearn keys generate --out "clients/site-$i.key" --name "site-$i" \
    | sed -n '/^\[\[site\]\]/,$p' >> server/sites.toml
  sed -e "s/site-0/site-$i/g" -e 's/^backoff_max_s = 30/backoff_max_s = 30\nexit_when_finished = true/' \
    clients/site.toml > "clients/site-$i.toml"
done
$bin/fedlearn server --config server/coordinator.toml &
server=$!
pids=()
for i in 0 1 2; do
  $bin/fedlearn client --config "clients/site-$i.toml" --no-verbose &
  pids+=($!)
done
wait "$server"
for p in "${pids[@]}"; do wait "$p"; done
echo "global model: server/state/model.safetensors; run store: server/state/run.db"
echo "report:       $bin/fedlearn report server/state  (run id: breast-cancer)"
echo "registry:     $bin/fedlearn models list --registry server/state/registry"
echo "serve it:     $bin/fedlearn serve --registry server/state/registry --path ."
