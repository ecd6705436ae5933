"""``ckpt``: the command line. Known errors become one line (what, where, what to do); ``--traceback`` shows more."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import NoReturn

from ckptstore.cli.common import describe_error
from ckptstore.errors import CkptStoreError

EXIT_ERROR = 2


class CkptParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the (sub-)command, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out.extend(_leaf_parsers(sub) or [sub])
    return out


def build_parser() -> argparse.ArgumentParser:
    from ckptstore.cli import analyze_cmds, io_cmds, meta_cmds, policy_cmds, release_cmds, report_cmds, store_cmds
    from ckptstore.cli.archive_cmds import register as register_archive
    from ckptstore.cli.average_cmds import register as register_average

    parser = CkptParser(
        prog="ckpt",
        description="Keep the whole trajectory of a training run: lossless delta-compressed checkpoints.",
        epilog="References: RUN@STEP, RUN@step=N, RUN@epoch=N, RUN@latest, RUN@first, RUN@tag:NAME, "
        "RUN@best:METRIC. The store defaults to $CKPT_STORE, else ./ckpt.store. Every option has one spelling "
        "and one meaning across the commands (docs/cli.md).",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors (anywhere)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    store_cmds.register(sub)
    io_cmds.register(sub)
    meta_cmds.register(sub)
    release_cmds.register(sub)
    policy_cmds.register(sub)
    register_archive(sub)
    analyze_cmds.register(sub)
    register_average(sub)
    report_cmds.register(sub)
    for leaf in _leaf_parsers(parser):
        leaf.set_defaults(_parser=leaf)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    parser = getattr(args, "_parser", None)
    return parser.prog if parser is not None else "ckpt"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``ckpt`` command; its exit status. Called without ``argv`` (as the ``ckpt`` program: the console
    script, ``python -m ckptstore.cli``), it ends the process itself once the command is done and torch is loaded
    (:func:`_end_process`); with ``argv`` (tests, programs) it always returns."""
    rc = _run(argv)
    if argv is None:
        _end_process(rc)
    return rc


def _end_process(rc: int) -> None:
    """End the program now, without the interpreter's teardown, when torch is loaded (otherwise return).

    With torch, open_clip, scikit-learn and matplotlib loaded, Python's finalisation and the C++ libraries' exit
    handlers cost 1-2 s of CPU and raise the peak memory by about 120 MB after the command is done (``ckpt report``:
    docs/benchmarks.md). Every file a command writes is closed and renamed into place before it returns, so what
    that teardown would still do for us is done here, in its order: wait for non-daemon threads (and stop idle
    thread pools), run the ``atexit`` handlers (logging, temporary folders), flush stdout and stderr.
    ``CKPT_FULL_EXIT=1`` keeps the normal exit."""
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first when it exits
    if "torch" not in sys.modules or os.environ.get("CKPT_FULL_EXIT") or shutdown is None:
        return
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`ckpt ... | head`): nothing more to say
            stream.flush()
    os._exit(rc)


def _run(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv or bool(os.environ.get("CKPT_TRACEBACK"))
    argv = [a for a in argv if a != "--traceback"]  # accepted before or after the command
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    leaf: argparse.ArgumentParser = getattr(args, "_parser", parser)
    if extra:
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    args.traceback = traceback
    where = _command_name(args)
    try:
        with warnings.catch_warnings():
            # Foreign libraries' warnings (torch's pickle-protocol notice on old .pt files ...) are not the user's
            # business: the command either works or fails with its own one-line error.
            if not traceback:
                warnings.simplefilter("ignore")
            rc = args.func(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print(f"{where}: interrupted; committed checkpoints are unaffected", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a command's own usage error: one line, like the rest
            msg = exc.code.split(": ", 1)[1] if exc.code.startswith("ckpt") and ": " in exc.code else exc.code
            print(f"{where}: error: {msg}", file=sys.stderr)
            return EXIT_ERROR
        raise
    except (CkptStoreError, OSError) as exc:
        if traceback:
            raise
        print(f"{where}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a foreign library failed in a way we did not foresee: still no traceback
        if traceback:
            raise
        print(f"{where}: error: {describe_error(exc)} — rerun with --traceback for details, and please report it",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
