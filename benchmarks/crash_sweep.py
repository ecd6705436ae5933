"""Crash sweep (issue 14, item 1): SIGKILL a child process running a save, an async save, a delete, a thin, a gc
or a compaction, at every write point (local disk: every open, write, flush, fsync, rename/link and directory
sync; S3: every put, conditional put, multipart start, part, completion, abort and delete:
``ckptstore.storage.faults``) and at random moments, then check from a fresh Store that no committed checkpoint is
damaged, the target is wholly old or wholly new, ``verify`` is clean after ``gc`` and nothing is left over
(``ckptstore.testing.crash``).

    PYTHONPATH=src python benchmarks/crash_sweep.py [--backend local,s3] [--ops save,async,delete,thin,gc,compact]
        [--random 60] [--s3-random 30] [--seed 0] [--json OUT]

On S3 (a moto server this script starts) only saves are swept (``--ops`` there: save,async). Prints a table per
op and backend; exit status 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ckptstore.testing import crash


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="local,s3", help="comma-separated: local, s3 (default both)")
    ap.add_argument("--ops", default=",".join(crash.OPS), help="comma-separated ops (on s3 only save,async run)")
    ap.add_argument("--random", type=int, default=60, help="random-moment kills on local disk")
    ap.add_argument("--s3-random", type=int, default=30, help="random-moment kills on S3")
    ap.add_argument("--no-points", action="store_true", help="random kills only (no kill at every write point)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per trial")
    args = ap.parse_args()
    ops = tuple(o for o in args.ops.split(",") if o)
    for op in ops:
        if op not in crash.OPS:
            ap.error(f"unknown op {op!r}; use some of {','.join(crash.OPS)}")
    backends = [b for b in args.backend.split(",") if b]
    for b in backends:
        if b not in crash.BACKENDS:
            ap.error(f"unknown backend {b!r}; use local and/or s3")

    def log(t: crash.CrashTrial) -> None:
        if args.verbose or t.failures:
            state = "FAIL " + "; ".join(t.failures) if t.failures else "ok"
            print(f"{t.backend} {t.op} {t.kill} [{t.point}] killed={t.killed} mid={t.mid_op} {t.outcome}: {state}",
                  file=sys.stderr, flush=True)  # fmt: skip

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        crash.base_store(base)
        for b in backends:
            b_ops = ops if b == "local" else tuple(o for o in ops if o in crash.S3_OPS)
            if not b_ops:
                continue
            t0 = time.perf_counter()
            res = crash.sweep(
                base,
                Path(d) / "work",
                ops=b_ops,
                backend=b,
                random_kills=args.random if b == "local" else args.s3_random,
                points=not args.no_points,
                seed=args.seed,
                log=log,
            )
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(res)
    print(crash.table(results))
    for res in results:
        print(f"{res['backend']}: {res['trials']} trials, {res['killed']} killed, {res['failures']} failed, "
              f"{res['seconds']} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
