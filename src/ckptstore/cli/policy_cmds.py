"""Policy commands: thin (retention), select (key checkpoints), watch (follow a running open_clip_train job)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_store_arg,
    get_store,
    print_json,
    print_table,
    progress_bar,
    require_run,
)
from ckptstore.util import human_bytes as human


def register(sub: Any) -> None:
    p = sub.add_parser(
        "thin",
        help="keep only what retention policies name (the rest stays bit-exact)",
        description="Apply retention policies to a run: print what stays and what goes, with reasons and the bytes "
        "freed, then delete what goes (unless --dry-run). Pinned checkpoints and the latest one are always kept; "
        "thinning again removes nothing. Policies: last:N, first[:N], best:METRIC[:K][:min|max], every:N "
        "(steps), log[:BASE], tagged[:TAG], pinned, select:N[:metric=NAME] (docs/policies.md).",
    )
    add_store_arg(p)
    p.add_argument("run", help="run name")
    p.add_argument("--keep", "-k", action="append", required=True, metavar="POLICY",
                   help="retention policy (repeatable, or comma-separated): their union is kept")  # fmt: skip
    p.add_argument("--keep-weights", action="append", metavar="POLICY",
                   help="retention policy (same grammar, e.g. all) whose checkpoints keep their weights but lose "
                   "their optimizer state unless --keep keeps them whole (weights-only tier)")  # fmt: skip
    p.add_argument("--dry-run", "-n", action="store_true", help="show the plan, delete nothing")
    p.add_argument("--weights", metavar="PREFIX", help="tensor prefix of the model weights (default: guessed)")
    add_json_arg(p, "the plan (and what was deleted)")
    p.set_defaults(func=cmd_thin)

    p = sub.add_parser(
        "select",
        help="choose N checkpoints that cover a run, and say why",
        description="Choose N key checkpoints: always the first and the last, then greedy farthest-point picks "
        "along the progress curve (fraction of steps, fraction of the weight path travelled) and the change "
        "points of the metric curves. Each choice comes with its reason. Read-only; `ckpt thin RUN --keep "
        "select:N` keeps exactly these.",
    )
    add_store_arg(p)
    p.add_argument("run", help="run name")
    p.add_argument("n", type=int, help="how many checkpoints")
    p.add_argument("--metric", "-m", action="append", help="metric whose change points count (repeatable; "
                   "default: the recorded metrics with 'loss' in the name)")  # fmt: skip
    p.add_argument("--weights", metavar="PREFIX", help="tensor prefix of the model weights (default: guessed)")
    p.add_argument("--no-weights", action="store_true", help="use steps only (do not read the weights)")
    add_json_arg(p, "the choices and their reasons")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser(
        "watch",
        help="follow a running open_clip_train job and store each epoch as it is completed",
        description="Watch an open_clip_train run folder (or its checkpoints/ folder) and store each epoch_N.pt "
        "once it is completely written (size stable across polls and torch.load(weights_only=True) succeeds). "
        "epoch_latest.pt is never stored. With --prune the original is removed only after the store commit. "
        "params.txt, results.jsonl and out.log go into the metadata. Exits when --pid exits or after "
        "--idle-timeout seconds without a new file, after a final pass.",
    )
    add_store_arg(p)
    p.add_argument("folder", help="RUN_DIR or RUN_DIR/checkpoints")
    p.add_argument("--run", help="run name (default: the training run's folder name)")
    p.add_argument("--prune", action="store_true", help="remove each epoch_N.pt once it is stored")
    p.add_argument("--pid", type=int, help="exit when this process (the trainer) has exited")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="exit after this long without a new or changed file (0: one pass)")  # fmt: skip
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="seconds between scans (default 5)")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="a file must keep its size this long before it is read (default: --poll)")  # fmt: skip
    p.add_argument("--keep", "-k", action="append", metavar="POLICY", help="online retention after each epoch")
    p.add_argument("--keep-weights", action="append", metavar="POLICY",
                   help="with --keep: what only this keeps stays weights-only (e.g. all)")  # fmt: skip
    p.add_argument("--init", action="store_true", help="create the store if it does not exist")
    p.add_argument("--json", action="store_true", help="print one JSON object per event on standard output")
    p.set_defaults(func=cmd_watch)


# ---------------------------------------------------------------------------------------------------- thin
def _label(epoch: Any, step: Any) -> str:
    if epoch is None:
        return "-"
    return str(int(epoch)) if float(epoch).is_integer() else str(epoch)


def cmd_thin(args: argparse.Namespace) -> int:
    from ckptstore.policy import thin

    store = get_store(args)
    require_run(store, args.run)
    with progress_bar("measuring the weight path") as prog:
        the_plan, recs = thin.plan_thin(store, args.run, args.keep, keep_weights=args.keep_weights,
                                        prefix=args.weights, progress=prog)  # fmt: skip
    report: dict[str, Any] = {"run": args.run, "dry_run": bool(args.dry_run), **the_plan.as_dict()}
    if not args.json:
        rows = []
        for e in the_plan.entries:
            if e.step in the_plan.weights_only:
                rows.append(("weights", e.step, _label(e.epoch, e.step), human(e.stored_bytes),
                             "; ".join(the_plan.weights_only[e.step])))  # fmt: skip
            elif e.step in the_plan.keep:
                rows.append(("keep", e.step, _label(e.epoch, e.step), human(e.stored_bytes),
                             "; ".join(the_plan.keep[e.step])))  # fmt: skip
            else:
                rows.append(("drop", e.step, _label(e.epoch, e.step), human(e.stored_bytes), the_plan.drop[e.step]))
        print_table(None, ["", "step", "epoch", "stored", "why"], rows, ["left", "right", "right", "right", "left"])
        print(
            f"{args.run}: keeps {len(the_plan.keep)}"
            + (f" ({len(the_plan.weights_only)} of them weights-only)" if the_plan.weights_only else "")
            + f", removes {len(the_plan.drop)}; frees about "
            f"{human(the_plan.freed_estimate)} (the removed checkpoints' own bytes, less what re-encoding the "
            f"kept checkpoints that were deltas against them takes back)"
        )
    if not args.dry_run:
        before = store.stats(args.run)["pack_bytes"]
        with progress_bar("re-encoding dependents") as prog:
            res = thin.apply_plan(store, args.run, the_plan, recs, progress=prog)
        after = store.stats(args.run)["pack_bytes"]
        report.update({"deleted": res["deleted"], "rewritten": res["rewritten"], "freed_bytes": res["freed_bytes"],
                       "slimmed": res["weights_only"],
                       "run_bytes_before": before, "run_bytes_after": after,
                       "recorded_paths": res["recorded_paths"]})  # fmt: skip
        if not args.json:
            print(
                f"deleted {len(res['deleted'])} checkpoint(s); dropped the optimizer state of "
                f"{len(res['weights_only'])}; re-encoded {res['rewritten']} dependent(s); freed "
                f"{human(res['freed_bytes'])} ({human(before)} → {human(after)} for {args.run})"
            )
    elif not args.json:
        print("dry run: nothing deleted")
    if args.json:
        print_json(report)
    return 0


# -------------------------------------------------------------------------------------------------- select
def cmd_select(args: argparse.Namespace) -> int:
    from ckptstore.policy import thin
    from ckptstore.policy.select import select

    store = get_store(args)
    require_run(store, args.run)
    with progress_bar("measuring the weight path") as prog:
        entries = thin.history(store, args.run, paths=not args.no_weights, prefix=args.weights,
                                       progress=prog)  # fmt: skip
    choices = select(entries, args.n, metrics=args.metric)
    by_step = {e.step: e for e in entries}
    rows = []
    for c in choices:
        e = by_step[c.step]
        rows.append({**c.as_dict(), "ref": f"{args.run}@{c.step}", "epoch": e.epoch, "path": e.path,
                     "metrics": dict(e.metrics)})  # fmt: skip
    if args.json:
        print_json({"run": args.run, "n": args.n, "of": len(entries), "choices": rows})
        return 0
    print_table(
        None,
        ["ref", "epoch", "phase", "kind", "why"],
        [(r["ref"], _label(r["epoch"], r["step"]), r["phase"], r["kind"], r["reason"]) for r in rows],
    )
    print(f"{len(choices)} of {len(entries)} checkpoints; `ckpt thin {args.run} --keep select:{args.n}` keeps them")
    return 0


# --------------------------------------------------------------------------------------------------- watch
def cmd_watch(args: argparse.Namespace) -> int:
    from ckptstore.integrations.watch import Watcher, WatchEvent

    store = get_store(args, create=args.init)

    def show(ev: WatchEvent) -> None:
        if args.json:
            sys.stdout.write(json.dumps(ev.as_dict(), default=str) + "\n")
        else:
            sys.stdout.write(f"{ev}\n")
        sys.stdout.flush()

    settle = args.settle if args.settle is not None else args.poll
    watcher = Watcher(store, args.folder, run=args.run, prune=args.prune, settle=settle, keep=args.keep,
                      keep_weights=args.keep_weights, on_event=show)  # fmt: skip
    events = watcher.run_until(poll=args.poll, pid=args.pid, idle_timeout=args.idle_timeout)
    stored = sum(e.kind == "stored" for e in events)
    left = [e for e in events if e.kind in ("incomplete", "conflict", "error")]
    if not args.json:
        print(f"watch: stored {stored} checkpoint(s)" + (f"; {len(left)} file(s) left alone" if left else ""))
    return 0
