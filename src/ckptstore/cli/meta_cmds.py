"""Metadata commands: tag, untag, note, metrics; the ``--where/--sort/--columns`` side of ``ls``; ``show``'s
metadata block. Edits rewrite only the checkpoint's manifest (atomically); tensors are never touched."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptstore import metadata as md
from ckptstore import query
from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    check_output_file,
    get_store,
    print_json,
    print_table,
    require_run,
    training_step,
)
from ckptstore.util import human_bytes as human

WHERE_HELP = (
    'keep checkpoints matching an expression, e.g. "metrics.zeroshot_top1 > 0.5 and epoch >= 3"; operators '
    "== != < <= > >= in, not in, and, or, not, parentheses; 'null' for missing (docs/metadata.md)"
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tag",
        help="add tags to a checkpoint",
        description="Add tags to a checkpoint (RUN@tag:NAME then names it). Only the manifest is rewritten.",
    )
    add_store_arg(p)
    p.add_argument("ref", help="checkpoint reference, e.g. myrun@epoch=5")
    p.add_argument("tags", nargs="+", help="tags (no spaces, at most 128 characters)")
    p.add_argument("--move", action="store_true", help="take the tags off the run's other checkpoints first")
    add_json_arg(p, "the checkpoint's tags and notes")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("untag", help="remove tags from a checkpoint", description="Remove tags from a checkpoint.")
    add_store_arg(p)
    p.add_argument("ref", help="checkpoint reference")
    p.add_argument("tags", nargs="+", help="tags to remove (absent ones are ignored)")
    add_json_arg(p, "the checkpoint's tags and notes")
    p.set_defaults(func=cmd_untag)

    p = sub.add_parser(
        "note",
        help="set or append a checkpoint's notes",
        description="Set a checkpoint's free-form notes (at most 64 KiB). TEXT '-' reads standard input.",
    )
    add_store_arg(p)
    p.add_argument("ref", help="checkpoint reference")
    p.add_argument("text", nargs="?", help="the new notes, replacing the old; '-' reads stdin")
    p.add_argument("--append", "-a", metavar="TEXT", help="add TEXT as a new line after the notes ('-': stdin)")
    p.add_argument("--clear", action="store_true", help="remove the notes")
    add_json_arg(p, "the checkpoint's tags and notes")
    p.set_defaults(func=cmd_note)

    p = sub.add_parser(
        "metrics",
        help="a run's metrics over time (table or CSV)",
        description="Print the per-checkpoint metric table of a run: ref, step, epoch, samples seen, training "
        "loss and every eval metric recorded in the metadata.",
    )
    add_store_arg(p)
    p.add_argument("run", help="run name")
    p.add_argument("--where", "-w", help=WHERE_HELP)
    p.add_argument("--csv", action="store_true", help="print CSV on standard output instead of a table")
    add_out_arg(p, "write the table as CSV to FILE (checked before the store is read)")
    add_json_arg(p, "the columns and rows")
    p.set_defaults(func=cmd_metrics)


def add_query_args(p: argparse.ArgumentParser) -> None:
    """``--where``, ``--sort``, ``--columns``, ``--limit`` for ``ckpt ls``."""
    p.add_argument("--where", "-w", help=WHERE_HELP)
    p.add_argument(
        "--sort",
        help="comma-separated fields; ':desc' after or '-' before a field sorts it descending "
        "(write --sort=-metrics.acc, or --sort metrics.acc:desc); missing values come last",
    )
    p.add_argument("--columns", "-c", help="comma-separated fields to show, e.g. ref,epoch,lr.0,metrics.*")
    p.add_argument("--limit", type=int, help="at most this many rows (after sorting)")


def wants_query(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("where", "sort", "columns", "limit"))


def json_safe(value: Any) -> Any:
    """Non-finite floats tagged as the store keeps them, so ``--json`` output stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def cmd_ls_query(args: argparse.Namespace) -> int:
    """``ckpt ls`` with ``--where/--sort/--columns/--limit``."""
    for name in ("where", "sort", "columns"):  # check the expressions before opening the store
        text = getattr(args, name, None)
        if text is not None:
            {"where": query.parse_where, "sort": query.parse_sort, "columns": query.parse_columns}[name](text)
    store = get_store(args)
    rows = query.select(store, args.run, where=args.where, sort=args.sort, columns=args.columns, limit=args.limit)
    if args.json:
        print_json(json_safe(rows))
        return 0
    if args.columns:
        cols = list(rows[0]) if rows else query.parse_columns(args.columns)
        print_table(None, cols, [[query.format_value(r[c]) for c in cols] for r in rows])
        return 0
    print_table(
        None,
        ["ref", "epoch", "step", "logical", "stored", "ratio"],
        [
            (
                r["ref"],
                query.format_value(r["epoch"]),
                training_step(r["metadata"], r["step"]),
                human(r["logical_bytes"]),
                human(r["stored_bytes"]),
                f"{r['ratio']:.2f}x" if r["ratio"] else "-",
            )
            for r in rows
        ],
        ["left", "right", "right", "right", "right", "right"],
    )
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    m = md.add_tags(get_store(args), args.ref, args.tags, move=args.move)
    return _report(args, m)


def cmd_untag(args: argparse.Namespace) -> int:
    m = md.remove_tags(get_store(args), args.ref, args.tags)
    return _report(args, m)


def cmd_note(args: argparse.Namespace) -> int:
    given = [x for x in (args.text, args.append, True if args.clear else None) if x is not None]
    if len(given) != 1:
        raise SystemExit("ckpt note: give exactly one of TEXT, --append TEXT or --clear")
    text = None if args.clear else args.text if args.text is not None else args.append
    if text == "-":
        text = sys.stdin.read().rstrip("\n")
    m = md.set_notes(get_store(args), args.ref, text, append=args.append is not None)
    return _report(args, m)


def _report(args: argparse.Namespace, m: Any) -> int:
    meta = m.metadata
    if args.json:
        print_json({"ref": m.ref, "tags": meta.get("tags", []), "notes": meta.get("notes")})
    else:
        print(f"{m.ref}: tags {', '.join(meta.get('tags', [])) or '(none)'}")
        if meta.get("notes"):
            print(f"  notes: {_first_line(meta['notes'])}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.where:
        query.parse_where(args.where)
    if args.out:
        check_output_file(args.out)
    store = get_store(args)
    require_run(store, args.run)
    cols, rows = query.metrics_table(store, args.run, where=args.where)
    if args.csv:
        query.write_csv(cols, rows, sys.stdout)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".partial")
        try:
            with tmp.open("w", newline="") as f:
                query.write_csv(cols, rows, f)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        if not (args.json or args.csv):
            print(f"wrote {len(rows)} rows x {len(cols)} columns to {out}")
    if args.json:
        print_json(json_safe({"columns": cols, "rows": rows}))
    elif not (args.csv or args.out):
        shown = cols
        if "metadata.step" in cols:  # one meaning of "step": the training step (the ref keeps the store's key)
            shown = [c for c in cols if c != "step"]
        print_table(
            f"{args.run}: {len(rows)} checkpoint{'' if len(rows) == 1 else 's'}",
            ["step" if c == "metadata.step" else c for c in shown],
            [[query.format_value(r[c]) for c in shown] for r in rows],
            ["left"] + ["right"] * (len(shown) - 1),
        )
    return 0


# ---------------------------------------------------------------------------------------------- show
_ORDER = ("step", "epoch", "samples_seen", "tokens_seen", "wall_time", "lr", "loss", "grad_norm", "loss_scale",
          "counters", "metrics", "eval_samples", "tags", "notes", "save_reason", "model", "code", "versions",
          "hardware", "command", "hparams", "source", "schema")  # fmt: skip


def _first_line(text: str, width: int = 100) -> str:
    line = text.splitlines()[0] if text else ""
    more = len(line) > width or "\n" in text
    return line[:width] + (" …" if more else "")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _wrapped(key: str, text: str, width: int) -> list[str]:
    """``  key: text`` wrapped at ``width`` (continuation lines indented), never cut."""
    import textwrap

    return textwrap.wrap(text, width, initial_indent=f"  {key}: ", subsequent_indent=" " * (len(key) + 4),
                         break_long_words=False, break_on_hyphens=False) or [f"  {key}: "]  # fmt: skip


def metadata_lines(meta: Mapping[str, Any], line_width: int = 100) -> list[str]:
    """A checkpoint's metadata for ``ckpt show``: known fields first, readably; then any extra keys. Long values
    are wrapped at ``width``, never cut."""
    m = md.decode(meta)
    fv = query.format_value
    out: list[str] = []
    for key in [k for k in _ORDER if k in m] + [k for k in m if k not in _ORDER]:
        v = m[key]
        if key == "wall_time" and isinstance(v, int | float):
            out.append(f"  wall_time: {v:g} s ({_duration(v)})")
        elif key == "loss" and isinstance(v, Mapping):
            parts = [f"{k} {fv(v[k])}" for k in ("last", "avg") if k in v]
            window = f" over {v['window']} steps" if "window" in v else ""
            extra = [f"{k} {fv(x)}" for k, x in v.items() if k not in ("last", "avg", "window")]
            out.append(f"  loss: {', '.join(parts + extra)}{window}")
        elif key == "metrics" and isinstance(v, Mapping) and v:
            out.append(f"  metrics ({len(v)}):")
            width = max(len(k) for k in v)
            out.extend(f"    {k:<{width}}  {fv(x)}" for k, x in v.items())
        elif key == "notes" and isinstance(v, str):
            lines = v.splitlines() or [""]
            out.append(f"  notes: {lines[0]}")
            out.extend(f"         {line}" for line in lines[1:])
        elif key == "tags" and isinstance(v, list):
            out.append(f"  tags: {', '.join(map(str, v)) or '(none)'}")
        elif key == "code" and isinstance(v, Mapping):
            commit = str(v.get("commit", "?"))[:12]
            dirty = " (dirty)" if v.get("dirty") else ""
            branch = f" on {v['branch']}" if v.get("branch") else ""
            repo = f"  {v['repo']}" if v.get("repo") else ""
            out.append(f"  code: {commit}{dirty}{branch}{repo}")
        elif key == "hardware" and isinstance(v, Mapping):
            devices = v.get("devices") or []
            cpu = v.get("cpu")
            what = ", ".join(devices) if devices else str(v.get("accelerator", "cpu")) + (f" ({cpu})" if cpu else "")
            world = f"; world size {v['world_size']}" if v.get("world_size") is not None else ""
            out.append(f"  hardware: {what}{world}")
        elif key == "command" and isinstance(v, list):
            out.extend(_wrapped("command", " ".join(map(str, v)), line_width))
        elif key in ("hparams", "source", "versions", "counters") and isinstance(v, Mapping):
            text = ", ".join(f"{k}={fv(x)}" for k, x in v.items())
            out.extend(_wrapped(key, text, line_width))
        elif isinstance(v, Mapping | list) and len(str(v)) > 160:
            out.extend(_wrapped(key, fv(v), line_width))
        else:
            out.append(f"  {key}: {fv(v)}")
    return out
