#!/usr/bin/env bash
# Set up the venv (and Chromium, for the report's browser tests), then lint, type-check and run the whole test
# suite. This is exactly what CI runs (.ci/run).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# tests/analysis/test_report_browser.py renders the HTML report in headless Chromium (Debian package).
if ! command -v chromium >/dev/null; then
  echo "test: installing chromium (apt-get) for the report's browser tests ..." >&2
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
venv="$("$root/scripts/env.sh")"
cd "$root"
export PATH="$venv/bin:$PATH"
# The C kernels must be there (env.sh builds them): their tests fail rather than skip without them.
export CKPTSTORE_REQUIRE_KERNELS=1
echo "== ruff"; ruff check src tests benchmarks
echo "== mypy"; mypy
# Two workers (CI has 2 cores); whole files per worker, so a module's expensive fixtures (a trained run, a DCP
# job, an ingested store) are built once, not once per worker. Later options win: pass -n 0 to run in-process.
echo "== pytest"; python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
