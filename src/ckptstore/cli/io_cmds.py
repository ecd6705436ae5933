"""Import and export commands: ingest (open_clip_train ``epoch_N.pt``) and export (OpenCLIP ``.pt``, safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ckptstore.cli.common import add_store_arg, get_store, print_json, progress_bar
from ckptstore.format.manifest import CheckpointInfo
from ckptstore.util import human_bytes as human


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ingest",
        help="store open_clip_train epoch_N.pt files",
        description="Store epoch_N.pt files written by open_clip_train (files, a run folder or its "
        "checkpoints/ folder), in epoch order, as deltas against each other. Files are read with "
        "torch.load(weights_only=True); epochs already stored are skipped. epoch_latest.pt is never ingested.",
    )
    add_store_arg(p)
    p.add_argument("paths", nargs="+", help="epoch_N.pt files or folders")
    p.add_argument("--run", help="run name (default: the training run's folder name)")
    p.add_argument("--init", action="store_true", help="create the store if it does not exist")
    p.add_argument("--threads", type=int, help="encoder threads (default: 2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a .pt or safetensors file",
        description="Write a stored checkpoint back out. --format openclip writes the original "
        "open_clip_train dict (loadable by open_clip and by open_clip_train --resume); --format safetensors "
        "writes the model weights (state_dict).",
    )
    add_store_arg(p)
    p.add_argument("ref", help="checkpoint reference")
    p.add_argument("-O", "--out", required=True, help="output file")
    p.add_argument(
        "--format",
        choices=["openclip", "pt", "safetensors"],
        default="openclip",
        help="openclip/pt: torch.save of the stored state; safetensors: the state_dict",
    )
    p.set_defaults(func=cmd_export)


def cmd_ingest(args: argparse.Namespace) -> int:
    from ckptstore.integrations import openclip

    store = get_store(args, create=args.init)
    rows: list[dict[str, Any]] = []

    def on_file(path: Path, info: CheckpointInfo | None) -> None:
        if info is None:
            rows.append({"file": str(path), "skipped": "already stored"})
            if not args.json:
                print(f"{path}: already stored, skipped")
            return
        rows.append({"file": str(path), **info.as_dict()})
        if not args.json:
            print(
                f"{path} -> {info.ref}  {human(info.logical_bytes)} -> {human(info.stored_bytes)} ({info.ratio:.2f}x)"
            )

    with progress_bar("encoding tensors") as prog:
        openclip.ingest(store, args.paths, run=args.run, on_file=on_file, progress=prog)
    if args.json:
        for r in rows:
            r.pop("metadata", None)
        print_json(rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ckptstore.integrations import openclip

    store = get_store(args)
    if args.format in ("openclip", "pt"):
        out = openclip.export_pt(store, args.ref, args.out)
    else:
        out = openclip.export_safetensors(store, args.ref, args.out)
    print(f"wrote {out} ({human(out.stat().st_size)})")
    return 0
