"""Store commands: init, ls, show, rm, gc, compact, verify, du."""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli import meta_cmds
from ckptstore.cli.common import (
    _out_width,
    add_json_arg,
    add_store_arg,
    get_store,
    print_json,
    print_table,
    progress_bar,
    require_run,
    training_step,
)
from ckptstore.store import DEFAULT_KEYFRAME_INTERVAL, DEFAULT_LAYOUT, DEFAULT_LEVEL, LAYOUTS, create_store
from ckptstore.util import human_bytes as human


def register(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="create an empty store",
        description="Create an empty store at PATH (or --store). Its write settings are recorded in the store "
        "(ckptstore.json), so every later writer (save, rm, thin, gc) uses the same ones.",
    )
    add_store_arg(p)
    p.add_argument("path", nargs="?", metavar="PATH", help="where to create the store (the same as --store)")
    add_json_arg(p, "the new store's URL and settings")
    p.add_argument(
        "--keyframe-interval",
        type=int,
        metavar="K",
        help=f"longest delta chain: a tensor is stored whole at least every K checkpoints "
        f"(default: {DEFAULT_KEYFRAME_INTERVAL}; smaller reads faster, larger stores smaller)",
    )
    p.add_argument(
        "--level",
        type=int,
        metavar="1-22",
        choices=range(1, 23),
        help=f"zstd level of the byte planes (default: {DEFAULT_LEVEL}; higher is a little smaller and much slower)",
    )
    p.add_argument(
        "--codec",
        metavar="NAME",
        help="registered bytes codec that ends every codec chain (default: planes-zstd; see docs/format.md §10)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        help=f"how saves are written (default: {DEFAULT_LAYOUT}): dense delta-codes every save; hot writes the "
        "changed tensors raw (the newest checkpoint reads like torch.load) and compacts older ones in the background",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "show-store",
        help="show the store's format version and write settings",
        description="Show the store's location, format version and the write settings recorded at `ckpt init`.",
    )
    add_store_arg(p)
    add_json_arg(p, "the store's format and settings")
    p.set_defaults(func=cmd_show_store)

    p = sub.add_parser(
        "ls",
        help="list runs or a run's checkpoints",
        description="List checkpoints: ref, epoch, step, logical size, stored size, ratio.",
    )
    add_store_arg(p)
    p.add_argument("run", nargs="?", help="only this run")
    add_json_arg(p, "the rows")
    meta_cmds.add_query_args(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", help="show one checkpoint", description="Show a checkpoint's metadata and tensors.")
    add_store_arg(p)
    p.add_argument("ref", help="checkpoint reference, e.g. myrun@latest")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its codec and stored size")
    add_json_arg(p, "the checkpoint (with every tensor)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "rm",
        help="delete checkpoints (the rest stay bit-exact)",
        description="Delete checkpoints. Checkpoints stored as deltas against a deleted one are "
        "re-encoded first, so every remaining checkpoint stays bit-exact; then space is freed.",
    )
    add_store_arg(p)
    p.add_argument("refs", nargs="+", help="checkpoint references")
    add_json_arg(p, "what was deleted and freed")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "gc",
        help="free space no checkpoint uses",
        description="Remove pack files no committed checkpoint references (left by deletes or "
        "interrupted saves) and compact mostly-dead packs.",
    )
    add_store_arg(p)
    add_json_arg(p, "what was removed and freed")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "compact",
        help="re-encode hot checkpoints densely",
        description="Re-encode the raw objects of a run's hot checkpoints (layout hot, docs/format.md §4.7) as "
        "deltas, as a dense save would have, then free the space. The newest checkpoint stays hot (fast to "
        "resume from) unless --newest.",
    )
    add_store_arg(p)
    p.add_argument("run", help="the run")
    p.add_argument("--newest", action="store_true", help="compact the newest checkpoint too (a finished run)")
    add_json_arg(p, "what was compacted")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser(
        "verify",
        help="decode everything and check every hash",
        description="Decode every stored object and compare it with its content hash.",
    )
    add_store_arg(p)
    p.add_argument("run", nargs="?", help="only this run")
    add_json_arg(p, "the checks and problems")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("du", help="storage use per run", description="Logical vs stored bytes per run.")
    add_store_arg(p)
    add_json_arg(p, "one row per run")
    p.set_defaults(func=cmd_du)


def cmd_init(args: argparse.Namespace) -> int:
    from ckptstore.cli.common import storage_options

    if args.keyframe_interval is not None and args.keyframe_interval < 1:
        raise SystemExit(f"ckpt init: --keyframe-interval must be at least 1, not {args.keyframe_interval}")
    store = create_store(
        args.path or args.store,
        storage_options=storage_options(args),
        keyframe_interval=args.keyframe_interval,
        level=args.level,
        codec=args.codec,
        layout=args.layout,
    )
    if args.json:
        print_json({"store": store.url, "created": True, "settings": store.settings})
    else:
        print(f"created store {store.url}")
    return 0


def cmd_show_store(args: argparse.Namespace) -> int:
    store = get_store(args)
    out = {
        "url": store.url,
        "format": store.info.get("format"),
        "version": store.info.get("version"),
        "created": store.info.get("created"),
        "settings": store.settings,
        "settings_recorded": "settings" in store.info,
    }
    if args.json:
        print_json(out)
        return 0
    print_table(
        None,
        ["field", "value"],
        [("url", out["url"]), ("format", f"{out['format']} v{out['version']}"), ("created", out["created"] or "-")]
        + [(k, f"{v}" + ("" if out["settings_recorded"] else " (default)")) for k, v in store.settings.items()],
        ["left", "left"],
    )
    return 0


def _ratio(logical: int, stored: int) -> str:
    return f"{logical / stored:.2f}x" if stored else "-"


def cmd_ls(args: argparse.Namespace) -> int:
    if meta_cmds.wants_query(args):
        return meta_cmds.cmd_ls_query(args)
    store = get_store(args)
    require_run(store, args.run)
    infos = store.checkpoints(args.run)
    if args.json:
        print_json([i.as_dict() for i in infos])
        return 0
    rows: list[tuple[Any, ...]] = [
        (
            i.ref,
            i.metadata.get("epoch", "-"),
            training_step(i.metadata, i.step),
            human(i.logical_bytes),
            human(i.stored_bytes),
            _ratio(i.logical_bytes, i.stored_bytes),
        )
        for i in infos
    ]
    logical = sum(i.logical_bytes for i in infos)
    stored = sum(i.stored_bytes for i in infos)
    if infos:
        rows.append(("total", "", "", human(logical), human(stored), _ratio(logical, stored)))
    headers = ["ref", "epoch", "step", "logical", "stored", "ratio"]
    aligns = ["left", "right", "right", "right", "right", "right"]
    if any(i.dropped for i in infos):  # a weights-only tier: say which checkpoints lack what
        rows = [(*r, _content(i.dropped)) for r, i in zip(rows, infos, strict=False)] + [(*rows[-1], "")]
        headers.append("content")
        aligns.append("left")
    print_table(None, headers, rows, aligns)
    return 0


def _content(dropped: list[str]) -> str:
    """What a checkpoint holds, in words: ``dropped`` lists ``optimizer`` (weights-only tier) and ``lossless``
    (the lossy archive tier, docs/archive.md)."""
    if not dropped:
        return "complete"
    words = []
    if "optimizer" in dropped:
        words.append("weights only (no optimizer state)")
    if "lossless" in dropped:
        words.append("LOSSY (error-bounded, ckpt archive)")
    words += [f"without {d}" for d in dropped if d not in ("optimizer", "lossless")]
    return ", ".join(words)


def cmd_show(args: argparse.Namespace) -> int:
    store = get_store(args)
    m = store.resolve(args.ref)
    info = m.info()
    own = {i.step: i for i in store.checkpoints(m.run)}[m.step]
    tensors = []
    for name, t in m.tensors.items():
        rec = m.objects[t["object"]]
        tensors.append(
            {
                "name": name,
                "dtype": t["dtype"],
                "shape": t["shape"],
                "object": t["object"],
                "codecs": [c["name"] for c in rec["codecs"]] or ["raw"],
                "delta_of": rec.get("refs", {}).get("prev"),
                "stored_bytes": rec["length"],
            }
        )
    out = {
        "ref": m.ref,
        "run": m.run,
        "step": m.step,
        "created": info.created,
        "logical_bytes": info.logical_bytes,
        "stored_bytes": own.stored_bytes,
        "tensors": len(tensors),
        "dropped": m.data.get("dropped", []),
        "lossy": m.data.get("lossy"),
        "metadata": m.metadata,
    }
    if args.json:
        out["tensor_list"] = tensors
        print_json(out)
        return 0
    print(f"{m.ref}   created {info.created}")
    print(
        f"  {len(tensors)} tensors, {human(info.logical_bytes)} logical, {human(own.stored_bytes)} stored "
        f"({_ratio(info.logical_bytes, own.stored_bytes)})"
    )
    lossy = m.data.get("lossy")
    if isinstance(lossy, dict):
        b = ", ".join(f"{k} {v.get('mode')}:{v.get('value')}" for k, v in (lossy.get("bounds") or {}).items())
        print(
            f"  LOSSY (ckpt archive, {lossy.get('codec')}): {len(lossy.get('tensors') or {})} tensors within "
            f"the recorded bounds ({b}); `ckpt show --json` lists each tensor's bound and max error"
        )
    for rec in m.data.get("dropped", []):
        print(
            f"  {_content([str(rec.get('part'))])}: dropped {rec.get('time', '')} by {rec.get('reason', 'ckpt')} "
            f"({rec.get('tensors')} tensors; this checkpoint cannot resume training)"
        )
    for line in meta_cmds.metadata_lines(m.metadata, line_width=_out_width() or 100):
        print(line)
    if args.tensors:
        print_table(
            None,
            ["tensor", "dtype", "shape", "coding", "stored"],
            [
                (
                    t["name"],
                    t["dtype"],
                    "x".join(map(str, t["shape"])) or "()",
                    "+".join(t["codecs"]) + (" (delta)" if t["delta_of"] else ""),
                    human(t["stored_bytes"]),
                )
                for t in tensors
            ],
        )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = get_store(args)
    with progress_bar("re-encoding dependents") as prog:
        res = store.delete(args.refs, progress=prog)
    if args.json:
        print_json(res)
    else:
        print(
            f"deleted {', '.join(res['deleted'])}; re-encoded {res['rewritten']} dependent checkpoint(s); "
            f"freed {human(res['freed_bytes'])}"
        )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    res = get_store(args).gc()
    if args.json:
        print_json(res)
    else:
        print(f"removed {res['removed_packs']} unreferenced pack(s); freed {human(res['freed_bytes'])}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    store = get_store(args)
    require_run(store, args.run)
    with progress_bar("compacting") as prog:
        res = store.compact(args.run, newest=args.newest, progress=prog)
    if args.json:
        print_json(res)
    else:
        rate = f" ({human(res['bytes_per_second'])}/s)" if res["bytes_per_second"] else ""
        print(
            f"compacted {len(res['compacted'])} checkpoint(s), {human(res['logical_bytes'])}{rate}; "
            f"freed {human(res['freed_bytes'])}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = get_store(args)
    require_run(store, args.run)
    with progress_bar("verifying") as prog:
        res = store.verify(args.run, progress=prog)
    if args.json:
        print_json(res)
    else:
        for p in res["problems"]:
            print(f"PROBLEM {p}")
        state = "OK" if res["ok"] else f"{len(res['problems'])} PROBLEM(S)"
        print(f"verified {res['checkpoints']} checkpoints, {res['objects']} objects: {state}")
    return 0 if res["ok"] else 1


def cmd_du(args: argparse.Namespace) -> int:
    store = get_store(args)
    rows = []
    for run in store.runs():
        st = store.stats(run)
        rows.append({"run": run, **st})
    if args.json:
        print_json(rows)
        return 0
    print_table(
        None,
        ["run", "checkpoints", "logical", "stored", "ratio"],
        [
            (
                r["run"],
                r["checkpoints"],
                human(r["logical_bytes"]),
                human(r["pack_bytes"]),
                _ratio(r["logical_bytes"], r["pack_bytes"]),
            )
            for r in rows
        ],
        ["left", "right", "right", "right", "right"],
    )
    return 0
