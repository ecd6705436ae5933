"""``ckpt analyze``: research answers from a stored run, one subcommand per analysis (docs/analysis-dynamics.md,
docs/analysis-representations.md)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyse a run: weights, representations, stability, transfer, averages, interpolation, optimizer, "
        "plasticity",
        description="Research answers from a stored run, read checkpoint by checkpoint and tensor by tensor. "
        "RUN is a run of the store, or a folder of open_clip_train epoch_N.pt files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    from ckptstore.cli import analyze_dynamics, analyze_landscape, analyze_probes

    analyze_dynamics.register(asub)  # weights, stability
    analyze_probes.register(asub)  # representations, transfer
    analyze_landscape.register(asub)  # averages, interpolation, optimizer, plasticity
