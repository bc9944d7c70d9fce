#!/usr/bin/env bash
# Make N bootstrap identities (kept if present) and render the seed list in every format.
# Usage: bash bootstrap/make-seeds.sh [N=1] [HOST=127.0.0.1] [PORT=4001]   (bootstrap i listens on PORT+i)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1}"; host="${2:-127.0.0.1}"; port="${3:-4001}"
MCPP="${MCPP:-.venv/bin/mcpp}"
mkdir -p bootstrap/keys bootstrap/out
args=()
for i in $(seq 0 $((n - 1))); do
  key="bootstrap/keys/bootstrap-$i.key"
  [ -f "$key" ] || "$MCPP" keygen --out "$key" >/dev/null
  args+=(--seed "$key:$host:$((port + i))")
done
for fmt in lines env yaml json configmap; do
  "$MCPP" seed "${args[@]}" --format "$fmt" > "bootstrap/out/seeds.$fmt"
done
cat bootstrap/out/seeds.lines
