"""``ckpt``: the command line. Known errors become one line (what, where, what to do); ``--traceback`` shows more."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ckptstore.errors import CkptStoreError

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from ckptstore.cli import analyze_cmds, io_cmds, meta_cmds, policy_cmds, release_cmds, report_cmds, store_cmds
    from ckptstore.cli.average_cmds import register as register_average

    parser = argparse.ArgumentParser(
        prog="ckpt",
        description="Keep the whole trajectory of a training run: lossless delta-compressed checkpoints.",
        epilog="References: RUN@STEP, RUN@step=N, RUN@epoch=N, RUN@latest, RUN@first, RUN@tag:NAME, "
        "RUN@best:METRIC. The store defaults to $CKPT_STORE, else ./ckpt.store.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    store_cmds.register(sub)
    io_cmds.register(sub)
    meta_cmds.register(sub)
    release_cmds.register(sub)
    policy_cmds.register(sub)
    analyze_cmds.register(sub)
    register_average(sub)
    report_cmds.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("ckpt: interrupted; committed checkpoints are unaffected", file=sys.stderr)
        return 130
    except (CkptStoreError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if args.traceback or os.environ.get("CKPT_TRACEBACK"):
            raise
        print(f"ckpt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
