"""Import and export commands: ingest (open_clip_train ``epoch_N.pt``, DCP folders) and export (OpenCLIP ``.pt``,
safetensors, a DCP folder)."""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
from pathlib import Path
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    check_output_file,
    check_output_folder,
    get_store,
    print_json,
    progress_bar,
)
from ckptstore.errors import InvalidStateError, OutputPathError
from ckptstore.format.manifest import CheckpointInfo
from ckptstore.store import Store
from ckptstore.util import human_bytes as human


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ingest",
        help="store open_clip_train epoch_N.pt files or DCP checkpoint folders",
        description="Store epoch_N.pt files written by open_clip_train (files, a run folder or its "
        "checkpoints/ folder), in epoch order, as deltas against each other. Files are read with "
        "torch.load(weights_only=True); epochs already stored are skipped. epoch_latest.pt is never ingested. "
        "A folder holding a .metadata file is a torch.distributed.checkpoint folder (FileSystemWriter): it is "
        "stored as one sharded checkpoint, its step taken from the folder name's trailing digits (or --step), "
        "its .metadata read by an allow-list unpickler (docs/dcp.md).",
    )
    add_store_arg(p)
    p.add_argument("paths", nargs="+", help="epoch_N.pt files or folders, or DCP checkpoint folders")
    p.add_argument("--run", help="run name (default: the training run's folder name; for a DCP folder, its parent's)")
    p.add_argument(
        "--step", type=int, help="the step of the one DCP folder given (default: its name's trailing digits)"
    )
    p.add_argument("--init", action="store_true", help="create the store if it does not exist")
    p.add_argument("--threads", type=int, help="encoder threads (default: 2)")
    add_json_arg(p, "one row per file")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a .pt or safetensors file, or a DCP folder",
        description="Write a stored checkpoint back out. --format pt (the default) writes the original "
        "open_clip_train dict with torch.save (loadable by open_clip and by open_clip_train --resume); "
        "--format safetensors writes the model weights (state_dict); --format dcp writes a new folder that "
        "torch.distributed.checkpoint's FileSystemReader loads on any number of ranks. A sharded (DCP) checkpoint "
        "is written as its full tensors.",
    )
    add_store_arg(p)
    p.add_argument("ref", help="checkpoint reference")
    add_out_arg(p, "the file (for dcp: the new folder) to write (checked before anything is read)", required=True)
    p.add_argument(
        "--format",
        choices=["pt", "safetensors", "dcp"],
        default="pt",
        help="pt (default): the stored state, torch.save'd, as open_clip_train wrote it; safetensors: the "
        "model's state_dict; dcp: a torch.distributed.checkpoint folder (.metadata + __0_0.distcp)",
    )
    add_json_arg(p, "the file written and its size")
    p.set_defaults(func=cmd_export)


def cmd_ingest(args: argparse.Namespace) -> int:
    from ckptstore.dcp_folder import is_dcp_folder

    for path in args.paths:
        if not Path(path).exists():
            raise FileNotFoundError(errno.ENOENT, "no such file or folder to ingest", path)
    dcp_dirs = [p for p in args.paths if is_dcp_folder(p)]
    if dcp_dirs and len(dcp_dirs) != len(args.paths):
        raise InvalidStateError(
            "give either DCP checkpoint folders or epoch_N.pt files/folders, not both", hint="ingest them in two calls"
        )
    if args.step is not None and len(dcp_dirs) != 1:
        raise InvalidStateError("--step needs exactly one DCP checkpoint folder", hint="ingest the folders one by one")
    if dcp_dirs:
        from ckptstore.dcp_folder import read_metadata

        for d in dcp_dirs:  # a forged or damaged .metadata is refused before the store is opened or created
            read_metadata(d)
    created = args.init and _is_new_local_store(args.store)
    store = get_store(args, create=args.init)
    try:
        return _ingest_dcp(args, store, dcp_dirs) if dcp_dirs else _ingest(args, store)
    except BaseException:
        if created and not store.runs():  # a failed first ingest leaves no empty store behind
            shutil.rmtree(args.store, ignore_errors=True)
        raise


def _is_new_local_store(path: str) -> bool:
    return "://" not in path and not Path(path, "ckptstore.json").exists()


def _ingest(args: argparse.Namespace, store: Store) -> int:
    from ckptstore.integrations import openclip

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


def _ingest_dcp(args: argparse.Namespace, store: Store, folders: list[str]) -> int:
    from ckptstore.dcp_folder import ingest_folder

    rows: list[dict[str, Any]] = []
    for folder in sorted(folders, key=lambda f: str(Path(f).resolve())):
        run = args.run or Path(folder).resolve().parent.name
        info = ingest_folder(store, folder, run, args.step).info()
        rows.append({"file": str(folder), **info.as_dict()})
        if not args.json:
            print(f"{folder} -> {info.ref}  {human(info.logical_bytes)} -> {human(info.stored_bytes)} "
                  f"({info.ratio:.2f}x)")  # fmt: skip
    if args.json:
        for r in rows:
            r.pop("metadata", None)
        print_json(rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ckptstore.integrations import openclip

    if args.format == "dcp":
        check_output_folder(args.out)
        if Path(args.out).exists():
            raise OutputPathError("the output folder already exists", path=str(args.out), hint="give a new folder")
    else:
        check_output_file(args.out)
    store = get_store(args)
    m = store.resolve(args.ref)  # a bad reference fails before anything is written
    if "lossy" in m.data and "lossy" not in Path(args.out).name.lower():
        raise OutputPathError(
            f"{m.ref} is a LOSSY checkpoint (ckpt archive); its file name must say so",
            path=str(args.out),
            hint=f"name it e.g. {Path(args.out).stem}.lossy{Path(args.out).suffix or '.pt'}",
        )
    if args.format == "pt":
        out = openclip.export_pt(store, args.ref, args.out)
    elif args.format == "dcp":
        from ckptstore.dcp_folder import export_folder

        out = export_folder(store, args.ref, args.out)
    else:
        out = openclip.export_safetensors(store, args.ref, args.out)
    dropped = store.resolve(args.ref).info().dropped
    if dropped and not args.json:
        print(f"warning: {args.ref} is {openclip.dropped_note(dropped)}", file=sys.stderr)
    if args.json:
        print_json({"ref": args.ref, "format": args.format, "file": str(out), "bytes": _size(out),
                    "dropped": dropped})  # fmt: skip
    else:
        print(f"wrote {out} ({human(_size(out))})")
    return 0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
