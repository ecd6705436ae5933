"""``ckpt release``: publish chosen checkpoints of a run as OpenCLIP folders with a model card (docs/release.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    check_output_folder,
    get_store,
    print_json,
    progress_bar,
    require_run,
)
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
    p.add_argument("run", nargs="?", help="the run to release (before or after the options)")
    add_out_arg(p, "the release folder (created; must be new or empty)", metavar="FOLDER", required=True)
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
    p.add_argument("--metric", "-m", action="append", metavar="NAME",
                   help="metrics for the table and curves (repeatable)")  # fmt: skip
    p.add_argument("--license", help="license id for the model card front matter (default: other)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    add_json_arg(p, "release.json")
    p.set_defaults(func=cmd_release)


def cmd_release(args: argparse.Namespace) -> int:
    from ckptstore.release import release

    if args.run is None and args.refs and len(args.refs) > 1:
        args.run = args.refs.pop()  # `--refs 1 2 RUN`: the list option took the run name too
    if args.run is None:
        raise SystemExit("ckpt release: give the run to release (RUN)")
    check_output_folder(args.out, "release folder")
    store = get_store(args)
    require_run(store, args.run)
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
