#!/usr/bin/env bash
# Set up (or reuse) the development venv and print its path (on stdout; progress goes to stderr).
# The venv lives outside the clone, keyed by the hash of what it is built from, so repeated runs and fresh clones
# reuse it; a missing or half-built cache is simply rebuilt. Override the location with CKPTSTORE_VENV_ROOT.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$(cat "$root/constraints.txt" "$root/requirements-dev.txt" | sha256sum | cut -c1-16)"
cache="${CKPTSTORE_VENV_ROOT:-$HOME/.cache/ckptstore}"
venv="$cache/venv-$key"
python="${PYTHON:-python3}"
start=$SECONDS
# One line per stage, with the time so far: nothing runs silently for minutes.
stage() { echo "env: [$1] $2 ($((SECONDS - start)) s so far)" >&2; }
# pip warns about every package missing from this machine's extra local index: keep its real errors only.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }
# pip install with one line per package it collects or installs, instead of minutes of silence.
pip_lines() {
  "$@" --progress-bar off 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } \
    | while IFS= read -r line; do
        case "$line" in
          Collecting*) echo "env:   collecting ${line#Collecting }" | sed "s/ (from .*//" >&2 ;;
          Installing\ collected*) echo "env:   installing the collected packages (a minute: torch is large)" >&2 ;;
          Successfully\ installed*) echo "env:   installed $(( $(echo "$line" | wc -w) - 2 )) packages" >&2 ;;
          *rror*|*ERROR*) echo "$line" >&2 ;;
        esac
      done
  return "${PIPESTATUS[0]}"
}
if [ ! -f "$venv/.complete" ]; then
  echo "env: setting up $venv (first run: about 3 minutes; later runs reuse it)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  stage 1/4 "creating the virtual environment"
  "$python" -m venv "$venv"
  stage 2/4 "upgrading pip"
  quiet_pip "$venv/bin/python" -m pip install -q --upgrade pip
  # constraints.txt pins torch and everything else, so no other torch is ever pulled in.
  stage 3/4 "installing the pinned packages (torch, open_clip, ...; the long step)"
  # pip says nothing while it unpacks torch and the CUDA wheels (a minute or more): a line every 15 s meanwhile.
  ( while sleep 15; do echo "env:   ... still installing ($((SECONDS - start)) s so far)" >&2; done ) &
  ticker=$!
  trap 'kill "$ticker" 2>/dev/null || true' EXIT
  pip_lines "$venv/bin/python" -m pip install -c "$root/constraints.txt" -r "$root/requirements-dev.txt"
  kill "$ticker" 2>/dev/null || true
  trap - EXIT
  touch "$venv/.complete"
  stage 4/4 "installing this clone (editable)"
fi
# The project itself: editable and without dependencies, so the shared venv always points at this clone. Skipped
# (it takes seconds) when the venv already points here and the packaging files have not changed since.
editable="$root $(cat "$root/pyproject.toml" "$root/setup.py" | sha256sum | cut -c1-16)"
# The C kernels (an optional extension, built in place by the editable install) are not in a fresh clone: build
# them whenever they are missing, even if the venv already points here, or everything runs on the slow fallback.
kernels_built() { compgen -G "$root/src/ckptstore/codecs/_kernels*.so" >/dev/null; }
if [ "$(cat "$venv/.editable" 2>/dev/null)" != "$editable" ] || ! kernels_built; then
  quiet_pip "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" \
    || quiet_pip "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  kernels_built || echo "env: the C kernels did not build (no C compiler?): the codecs use the slower numpy path" >&2
  echo "$editable" > "$venv/.editable"
fi
[ "$start" = "$SECONDS" ] || echo "env: ready: $venv ($((SECONDS - start)) s)" >&2
echo "$venv"
