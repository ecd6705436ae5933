"""``ckpt archive``: convert all but the key checkpoints of a run to the error-bounded lossy tier (docs/archive.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli.common import add_json_arg, add_store_arg, get_store, print_json, progress_bar, require_run
from ckptstore.util import human_bytes as human


def register(sub: Any) -> None:
    p = sub.add_parser(
        "archive",
        help="convert all but the kept checkpoints to the LOSSY, error-bounded tier (explicit, one-way)",
        description="Keep the checkpoints the retention policies name lossless and convert every other one to "
        "lossy-q objects: weights and Adam's exp_avg quantised against the reconstructed previous checkpoint "
        "(closed loop, errors do not accumulate), exp_avg_sq in the log domain, NaN/Inf kept exactly; other "
        "tensors unchanged. The bound and the largest error seen are recorded per tensor and checked by "
        "`ckpt verify`. The lossless bytes are freed; this cannot be undone (docs/archive.md).",
    )
    add_store_arg(p)
    p.add_argument("run", help="run name")
    p.add_argument("--keep", "-k", action="append", required=True, metavar="POLICY",
                   help="retention policy whose checkpoints stay lossless (e.g. select:5; repeatable)")  # fmt: skip
    p.add_argument("--bound", action="append", metavar="KIND=MODE:V",
                   help="per-element error bound of a tensor kind (weights, exp_avg: abs|rel; exp_avg_sq: elem); "
                   "default weights=rel:2e-3, exp_avg=rel:1e-2, exp_avg_sq=elem:0.05")  # fmt: skip
    p.add_argument("--dry-run", "-n", action="store_true", help="show the plan, change nothing")
    add_json_arg(p, "what was converted and the bytes freed")
    p.set_defaults(func=cmd_archive)


def cmd_archive(args: argparse.Namespace) -> int:
    from ckptstore import archive

    bounds = archive.parse_bounds(args.bound)  # bad bounds fail before the store is touched
    store = get_store(args)
    require_run(store, args.run)
    the_plan = archive.plan_archive(store, args.run, args.keep)
    already = [s for s in the_plan.drop if archive.is_lossy(store.manifest(args.run, s))]
    todo = sorted(set(the_plan.drop) - set(already))
    if args.dry_run:
        res: dict[str, Any] = {"run": args.run, "dry_run": True, "kept": sorted(the_plan.keep),
                               "to_convert": [f"{args.run}@{s}" for s in todo],
                               "already_lossy": [f"{args.run}@{s}" for s in sorted(already)]}  # fmt: skip
    else:
        with progress_bar("archiving") as prog:
            res = archive.archive(store, args.run, args.keep, bounds=bounds, progress=prog)
    if args.json:
        print_json(res)
        return 0
    print(f"{args.run}: {len(the_plan.keep)} stay lossless ({', '.join(map(str, sorted(the_plan.keep)))}); "
          f"{len(todo)} {'would become' if args.dry_run else 'became'} LOSSY; {len(already)} already were")  # fmt: skip
    if not args.dry_run:
        print(f"freed {human(res['freed_bytes'])} ({human(res['store_bytes_before'])} → "
              f"{human(res['store_bytes_after'])}); re-encoded {res['rewritten']} lossless dependent(s)")  # fmt: skip
    return 0
