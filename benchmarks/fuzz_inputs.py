"""Hostile inputs (issue 14, item 3): seeded structural mutations of every untrusted input the library reads —
manifests, packs, ``ckptstore.json``, ref strings, ``--where``/``--sort``/``--columns`` texts, foreign ``.pt``
files, safetensors files handed to ingest, DCP ``.metadata`` — each through its real entry point in a child process
under an address-space limit (its size after set-up + ``--headroom-gib``) and a per-case alarm
(``ckptstore.testing.fuzz_inputs``). Anything but the library's own errors is a finding.

    PYTHONPATH=src python benchmarks/fuzz_inputs.py --cases 100000 [--seed 0] [--target ref --target where]
        [--save DIR] [--json OUT]

``--cases`` is the total, shared among the chosen targets by their weight (cheap targets get more); ``T=N`` as a
``--target`` gives one target exactly N cases. ``--save DIR`` writes the first input of each finding kind,
minimized, to ``DIR/<target>/`` (where ``tests/corpus/`` files come from). Exit status 1 when there was a finding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ckptstore.testing.fuzz_inputs import TARGETS, run_target


def plan(cases: int, targets: list[str]) -> dict[str, int]:
    fixed = {t.split("=")[0]: int(t.split("=")[1]) for t in targets if "=" in t}
    shared = [t for t in targets if "=" not in t] or ([] if fixed else list(TARGETS))
    weight = sum(TARGETS[t].weight for t in shared)
    out = {t: max(1, round(cases * TARGETS[t].weight / weight)) for t in shared}
    return {**out, **fixed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000, help="total cases, shared by weight (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", default=[], help=f"T or T=N; T one of {', '.join(TARGETS)}")
    ap.add_argument("--slow", type=float, default=10.0, help="per-case alarm, seconds (default 10)")
    ap.add_argument("--headroom-gib", type=float, default=2.0, help="address space above the set-up size (GiB)")
    ap.add_argument("--save", help="write each new finding's input, minimized, under this folder")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    for t in args.target:
        if t.split("=")[0] not in TARGETS:
            ap.error(f"unknown target {t!r}; one of {', '.join(TARGETS)}")
    t0 = time.perf_counter()
    results = []
    for name, n in plan(args.cases, args.target).items():
        res = run_target(name, n, seed=args.seed, slow=args.slow, headroom=int(args.headroom_gib * 2**30),
                         save=args.save)  # fmt: skip
        results.append(res)
        kinds = ", ".join(f"{k}: {v['count']}" for k, v in res["finding_kinds"].items()) or "none"
        print(f"{name:12} {res['cases']:7d} cases  {res['refused']:7d} refused  {res['accepted']:7d} accepted  "
              f"findings {res['findings']} ({kinds})  {res['cases_per_s']} cases/s  peak RSS "
              f"{res['peak_rss_mib']} MiB", flush=True)  # fmt: skip
    total = {
        "seed": args.seed,
        "cases": sum(r["cases"] for r in results),
        "findings": sum(r["findings"] for r in results),
        "seconds": round(time.perf_counter() - t0, 1),
        "targets": results,
    }
    print(f"total {total['cases']} cases, {total['findings']} findings, {total['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(total, indent=2) + "\n")
    return 1 if total["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
