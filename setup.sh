#!/usr/bin/env bash
# Sets up everything mcpp needs on a fresh Debian 12 machine (idempotent):
#   Debian packages (gcc, GMP headers for fastecdsa), a venv in .venv, mcpp and its test/bench deps.
# Usage: bash setup.sh            (then .venv/bin/mcpp ...)
set -euo pipefail
cd "$(dirname "$0")"

need=()
for pkg in gcc libgmp-dev python3-dev mmdebstrap redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  }
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.mcpp-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing mcpp and its dependencies into .venv (pip)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,bench,docker,load,peers]"
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/mcpp --help >/dev/null && echo 'mcpp installed'))"
