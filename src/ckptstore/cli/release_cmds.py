"""``ckpt release``: publish chosen checkpoints of a run as OpenCLIP folders with a model card (docs/release.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli.common import add_store_arg, get_store, print_json, progress_bar
from ckptstore.util import human_bytes as human


def register(sub: Any) -> None:
    p = sub.add_parser(
        "release",
        help="publish checkpoints as OpenCLIP folders with a model card",
        description="Write chosen checkpoints of RUN to --out: one folder per checkpoint (epoch-05-step-4000/ with "
        "open_clip_config.json and open_clip_model.safetensors, loadable by "
        "open_clip.create_model_and_transforms('local-dir:FOLDER')), a model card README.md with a table and the "
        "metric curves (metrics.png), release.json and SHA256SUMS. --as-store adds the run's compact store.",
    )
    add_store_arg(p)
    p.add_argument("run", help="the run to release")
    p.add_argument("--out", "-O", required=True, help="release folder (created; must be new or empty)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--select", type=int, metavar="N", help="choose N key checkpoints")
    which.add_argument(
        "--refs", nargs="+", metavar="REF", help="these checkpoints (RUN@epoch=5, or just epoch=5, 4000)"
    )
    p.add_argument("--as-store", action="store_true", help="also copy the run's compact store (every kept checkpoint)")
    p.add_argument("--model-config", metavar="FILE", help="open_clip model config JSON, if the stored metadata's "
                   "model name is not in open_clip's registry")  # fmt: skip
    p.add_argument("--training-state", action="store_true",
                   help="also write the open_clip_train .pt (optimizer state included) into each folder")  # fmt: skip
    p.add_argument("--metric", action="append", metavar="NAME", help="metrics for the table and curves (repeatable)")
    p.add_argument("--license", help="license id for the model card front matter (default: other)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--json", action="store_true", help="print release.json")
    p.set_defaults(func=cmd_release)


def cmd_release(args: argparse.Namespace) -> int:
    from ckptstore.release import release

    store = get_store(args)
    if args.select is None and not args.refs and not args.as_store:
        raise SystemExit("ckpt release: choose checkpoints with --select N or --refs REF ..., or give --as-store")
    with progress_bar("writing checkpoints") as prog:
        info = release(
            store, args.run, args.out, select=args.select, refs=args.refs, as_store=args.as_store,
            model_config=args.model_config, training_state=args.training_state, metrics=args.metric,
            license=args.license, overwrite=args.force, progress=prog,
        )  # fmt: skip
    if args.json:
        print_json(info)
        return 0
    for c in info["checkpoints"]:
        size = sum(f["bytes"] for f in c["files"])
        print(f"{args.out}/{c['folder']}  {c['ref']}  {human(size)}  ({c['reason']})")
    if "store" in info:
        st = info["store"]
        print(f"{args.out}/{st['path']}  {len(st['steps'])} checkpoints, {human(st['bytes'])} "
              f"({human(st['logical_bytes'])} of tensors)")  # fmt: skip
    print(f"{args.out}/README.md, metrics.png, release.json, SHA256SUMS")
    return 0
