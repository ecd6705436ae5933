"""Crash sweep (issue 14, item 1): SIGKILL a child process running a save, delete, thin or gc, at every write
point (every open, write, flush, fsync, rename/link and directory sync: ``ckptstore.storage.faults``) and at
random moments, then check that no committed checkpoint is damaged, the target is wholly old or wholly new,
``verify`` is clean after ``gc`` and no temp file is left (``ckptstore.testing.crash``).

    PYTHONPATH=src python benchmarks/crash_sweep.py [--random 60] [--seed 0] [--json OUT]

Exit status 1 when any trial failed. Local disk only (the S3 saves' kill test is tests/test_crash.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ckptstore.testing import crash


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=60, help="kills at random moments, after the per-point ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        crash.base_store(base)
        t0 = time.perf_counter()
        res = crash.sweep(base, Path(d) / "work", random_kills=args.random, seed=args.seed)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
