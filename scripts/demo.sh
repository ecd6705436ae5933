#!/usr/bin/env bash
# Set up the venv, then train a small OpenCLIP model on CPU, store every epoch, and show what was saved.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/env.sh")"
cd "$root"
exec "$venv/bin/python" -m ckptstore.demo "$@"
