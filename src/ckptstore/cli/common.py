"""Shared pieces of the CLI: opening the store, human sizes, tables, JSON output, progress bars."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ckptstore.store import Store, open_store

DEFAULT_STORE = "ckpt.store"


def add_store_arg(p: argparse.ArgumentParser, *, short_option: bool = True) -> None:
    """``--store``/``-s`` and ``--storage-option``/``-o``; ``short_option=False`` leaves ``-o`` to the command
    (``ckpt report -o report.html``)."""
    p.add_argument(
        "--store",
        "-s",
        default=os.environ.get("CKPT_STORE", DEFAULT_STORE),
        help="store path or URL (default: $CKPT_STORE or ./ckpt.store)",
    )
    p.add_argument(
        "--storage-option",
        *(["-o"] if short_option else []),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for a remote filesystem (fsspec), e.g. endpoint_url=http://127.0.0.1:9000",
    )


_STRING_OPTIONS = {"key", "secret", "token", "username", "password", "profile", "cache_dir", "part_size", "cache_size"}


def _option_value(key: str, val: str) -> Any:
    """``true``/``false``/``none`` and numbers become Python values (fsspec wants ``anon=True``, not ``"true"``);
    credentials and sizes stay strings."""
    low = val.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if key.rsplit(".", 1)[-1] not in _STRING_OPTIONS:
        for conv in (int, float):
            try:
                return conv(val)
            except ValueError:
                pass
    return val


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` as fsspec ``storage_options``; a dotted KEY nests
    (``client_kwargs.region_name=eu-west-1``), ``endpoint_url`` goes to ``client_kwargs``. docs/remote.md."""
    out: dict[str, Any] = {}
    for item in getattr(args, "storage_option", []) or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"ckpt: --storage-option wants KEY=VALUE, got {item!r}")
        if key == "endpoint_url":
            key = "client_kwargs.endpoint_url"
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"ckpt: --storage-option {item!r} conflicts with an earlier option")
        node[leaf] = _option_value(key, val)
    return out


def get_store(args: argparse.Namespace, *, create: bool = False) -> Store:
    kwargs: dict[str, Any] = {"storage_options": storage_options(args)}
    if getattr(args, "threads", None):
        kwargs["threads"] = args.threads
    return open_store(args.store, create=create, **kwargs)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    justify: Sequence[str] | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        table.add_column(c, justify=(justify[i] if justify else "left"))  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console(width=max(100, min(200, _term_width()))).print(table)


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (hidden when stderr is not a terminal or disabled)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update
