"""Shared pieces of the CLI: opening the store, human sizes, tables, JSON output, progress bars."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptstore.errors import CkptStoreError, OutputPathError
from ckptstore.store import Store, open_store

if TYPE_CHECKING:
    from ckptstore.analysis.trajectory import Trajectory

DEFAULT_STORE = "ckpt.store"


def add_store_arg(p: argparse.ArgumentParser) -> None:
    """``--store``/``-s`` and ``--storage-option``/``-o``: the same two options, with the same meaning, on every
    command that reads a store (docs/cli.md)."""
    p.add_argument(
        "--store",
        "-s",
        default=os.environ.get("CKPT_STORE", DEFAULT_STORE),
        help="store path or URL (default: $CKPT_STORE or ./ckpt.store)",
    )
    p.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for a remote filesystem (fsspec), e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)",
    )
    p.add_argument(
        "--lock-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a run (or the store) that another job is writing, instead of failing at once",
    )


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: every command has it, with the same meaning."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on standard output (no table)")


def add_out_arg(
    p: argparse.ArgumentParser, what: str, *, metavar: str = "FILE", required: bool = False, default: str | None = None
) -> None:
    """``-O``/``--out``: the one spelling of "the file (or folder) this command writes"."""
    p.add_argument("-O", "--out", metavar=metavar, required=required, default=default, help=what)


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
    if getattr(args, "lock_wait", 0):
        kwargs["lock_wait"] = max(0.0, args.lock_wait)
    return open_store(args.store, create=create, **kwargs)


def open_run(args: argparse.Namespace) -> Trajectory:
    """The trajectory ``ckpt analyze`` reads from ``args.run``: paths that exist are read as files (one folder, or
    ``.pt`` files); a single other name is a store run. Output paths (``--out``, ``--plot``) are checked first."""
    from ckptstore.analysis.trajectory import StoreTrajectory, TrajectoryError, open_trajectory

    runs: list[str] = args.run
    for out in (getattr(args, "out", None), getattr(args, "plot", None)):
        if out:
            check_output_file(out)
    if all(Path(r).exists() for r in runs):
        return open_trajectory(runs[0] if len(runs) == 1 else runs)
    if len(runs) == 1:
        return StoreTrajectory(get_store(args), runs[0])
    missing = next(r for r in runs if not Path(r).exists())
    raise TrajectoryError(f"no such checkpoint file: {missing}", hint="give one store run, or existing .pt files")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _out_width() -> int | None:
    """The width tables must fit: ``$COLUMNS``, else the terminal's; None (no limit) when piped."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if not sys.stdout.isatty():
        return None
    try:
        return os.get_terminal_size().columns
    except OSError:
        return None


def format_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    justify: Sequence[str] | None = None,
    width: int | None = None,
) -> list[str]:
    """A plain-text table that never truncates a cell (a ref, a tensor name, a metric name).

    When the rows do not fit ``width``, the first column goes on its own line above the others; when even the
    others do not fit, each row becomes a block of ``column  value`` lines. Piped output (``width=None``) keeps one
    line per row, so it stays greppable.
    """
    cols = [str(c) for c in columns]
    cells = [[str(x) for x in r] for r in rows]
    just = list(justify) if justify else ["left"] * len(cols)
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Sequence[str], ws: Sequence[int], js: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if j == "right" else v.ljust(w) for v, w, j in zip(values, ws, js, strict=False)
        ).rstrip()

    out: list[str] = []
    if title:
        out.extend(textwrap.wrap(title, width) if width else [title])
    total = sum(widths) + 2 * (len(cols) - 1)
    if width is None or total <= width or len(cols) == 1:
        out.append(line(cols, widths, just))
        out.append(line(["-" * w for w in widths], widths, just))
        out.extend(line(r, widths, just) for r in cells)
        return out
    rest = widths[1:]
    if 2 + sum(rest) + 2 * (len(rest) - 1) <= width:
        out.append(cols[0])
        out.append("  " + line(cols[1:], rest, just[1:]))
        out.append("  " + line(["-" * w for w in rest], rest, just[1:]))
        for r in cells:
            out.append(r[0])
            out.append("  " + line(r[1:], rest, just[1:]))
        return out
    key_w = max(len(c) for c in cols[1:])
    for r in cells:
        out.append(f"{cols[0]}: {r[0]}")
        out.extend(f"  {c:<{key_w}}  {v}" for c, v in zip(cols[1:], r[1:], strict=False))
    return out


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    justify: Sequence[str] | None = None,
) -> None:
    sys.stdout.write("\n".join(format_table(title, columns, rows, justify, _out_width())) + "\n")


# ------------------------------------------------------------------------------------------- output paths
_ERRNO_HINTS = {
    errno.ENOENT: "check the path (its folder must exist)",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EROFS: "that file system is read-only; choose another path",
    errno.ENOSPC: "free some space, or choose another disk",
    errno.EEXIST: "choose a new name, or remove it first",
}


def describe_error(exc: BaseException) -> str:
    """One line for any error: which file, what went wrong, what to do; never a bare ``[Errno N]``, and a foreign
    library's message whole (its lines joined, never cut)."""
    if isinstance(exc, CkptStoreError):  # our own message, laid out on purpose (a caret under a bad query)
        return re.sub(r"\[Errno \d+\]\s*", "", str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        path = exc.filename2 if exc.filename2 is not None else exc.filename
        where = str(path).removesuffix(".partial") + ": " if path is not None else ""
        hint = _ERRNO_HINTS.get(exc.errno or 0)
        text = f"{where}{exc.strerror[:1].lower()}{exc.strerror[1:]}" + (f" — {hint}" if hint else "")
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = re.sub(r"\[Errno \d+\]\s*", "", text)
    return " ".join(text.split())


def check_output_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder, a missing parent folder, a place
    this process may not create files in. Probes by creating (and removing) a hidden file beside it."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"the {what} is an existing folder", path=str(p), hint="give a file name inside it")
    parent = p.parent
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"the {what}'s folder {why}", path=str(p), hint=f"create {parent} first, or choose "
                              "another path")  # fmt: skip
    probe = parent / f".{p.name}.ckpt-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise OutputPathError(f"cannot write the {what} there ({(exc.strerror or str(exc)).lower()})",
                              path=str(p), hint="choose a folder you can write to") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputPathError(f"the {what} exists and is not writable", path=str(p), hint="choose another path")
    return p


def check_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Like :func:`check_output_file` for a folder the command creates: its parent must exist and be writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"the {what} is an existing file", path=str(p), hint="give a folder path")
    if p.is_dir():
        return p
    check_output_file(p, what)
    return p


# ------------------------------------------------------------------------------------------------ progress
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


def _eta(elapsed: float, done: int, total: int) -> str:
    if done <= 0 or total <= 0 or done >= total:
        return ""
    return f", about {elapsed * (total - done) / done:.0f} s left"


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Progress on stderr: a rich bar on a terminal; otherwise (piped, CI, a log file) a plain line at most every
    ``PROGRESS_EVERY`` seconds with the count and an ETA, so nothing long runs silently."""
    if not enabled:
        yield lambda done, total: None
        return
    if not sys.stderr.isatty():
        start = time.monotonic()
        last = [start]

        def log(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                of = f"{done}/{total}" if total else f"{done}"
                print(f"  {description}: {of}, {now - start:.0f} s{_eta(now - start, done, total)}",
                      file=sys.stderr, flush=True)  # fmt: skip

        yield log
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def stage(what: str, where: str = "ckpt") -> Iterator[None]:
    """A line on stderr when a long stage starts and one when it ends, with its time."""
    print(f"{where}: {what} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    yield
    print(f"{where}: {what}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)


def emit_result(args: argparse.Namespace, blob: dict[str, Any]) -> bool:
    """Write ``--out`` (atomically) and print ``--json``; True when the human output is not wanted."""
    if getattr(args, "out", None):
        out = check_output_file(args.out)
        tmp = out.with_name(out.name + ".partial")
        try:
            tmp.write_text(json.dumps(blob, indent=2, allow_nan=False) + "\n")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    if args.json:
        print_json(blob)
    return bool(args.json)


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number for a table: ``digits`` significant digits, ``-`` for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"


def training_step(metadata: Any, key: int) -> int:
    """The "step" a table shows: the training step. An open_clip checkpoint without ``global_step`` is keyed by
    its epoch in the store (its ref says so); its metadata still holds the optimizer's step count."""
    step = metadata.get("step") if isinstance(metadata, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else key


def require_run(store: Store, run: str | None) -> None:
    """A run named on the command line must exist: an empty answer for a typo would look like success."""
    if run is not None and run not in store.runs():
        from ckptstore.errors import CheckpointNotFoundError

        known = ", ".join(store.runs()[:5]) or "none yet"
        raise CheckpointNotFoundError(f"no run {run!r} in this store (runs: {known})", path=store.url,
                                      hint="`ckpt ls` lists the runs")  # fmt: skip
