#!/usr/bin/env bash
# Set up (or reuse) the development venv and print its path.
# The venv lives outside the clone, keyed by the hash of what it is built from, so repeated runs and fresh clones
# reuse it; a missing or half-built cache is simply rebuilt. Override the location with CKPTSTORE_VENV_ROOT.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$(cat "$root/constraints.txt" "$root/requirements-dev.txt" | sha256sum | cut -c1-16)"
cache="${CKPTSTORE_VENV_ROOT:-$HOME/.cache/ckptstore}"
venv="$cache/venv-$key"
python="${PYTHON:-python3}"
# pip warns about every package missing from this machine's extra local index: keep its real errors only.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run takes a minute or two) ..." >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  quiet_pip "$venv/bin/python" -m pip install -q --upgrade pip
  # constraints.txt pins torch and everything else, so no other torch is ever pulled in.
  quiet_pip "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -r "$root/requirements-dev.txt"
  touch "$venv/.complete"
fi
# The project itself: editable and without dependencies, so the shared venv always points at this clone.
quiet_pip "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" \
  || quiet_pip "$venv/bin/python" -m pip install -q --no-deps -e "$root"
echo "$venv"
