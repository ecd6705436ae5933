"""``ckpt analyze``: research answers from a stored run (docs/analysis.md). Each analysis is a subcommand."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# The modules that add subcommands to ``ckpt analyze``; each has ``register(subparsers)``.
_ANALYSES = ("ckptstore.cli.analyze_dynamics", "ckptstore.cli.analyze_probes")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyse a run: weights, representations, stability, transfer",
        description="Research answers from a stored run, read checkpoint by checkpoint and tensor by tensor. "
        "RUN is a run of the store, or a folder of open_clip_train epoch_N.pt files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for mod in _ANALYSES:
        importlib.import_module(mod).register(asub)
