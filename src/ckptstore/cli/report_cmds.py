"""``ckpt report``: run the analyses that apply to a run and write one self-contained HTML page (docs/report.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    check_output_file,
    get_store,
    print_json,
    progress_bar,
    stage,
)

DEFAULT_OUTPUT = "report.html"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write an HTML report of a run: curves, weight dynamics, CKA, transfer, stability flags",
        description="Analyse RUN (a run of the store, or a folder of open_clip_train epoch_N.pt files) and write "
        "one self-contained HTML page: metric curves, per-module distance from initialisation, PCA trajectory, "
        "CKA heat maps, zero-shot / retrieval / transfer curves and stability flags. Representations and transfer "
        "need an OpenCLIP run whose model can be built; otherwise the page says why they are missing.",
    )
    add_store_arg(p)
    p.add_argument("run", help="the run to report on (or a folder of epoch_N.pt files)")
    add_out_arg(
        p,
        f"the HTML page to write (default: {DEFAULT_OUTPUT}; with --json, only when given); checked before the work",
        metavar="FILE.html",
    )
    p.add_argument(
        "--probe",
        default="digits",
        metavar="digits|CSV",
        help="probe set for representations and transfer: the built-in digits set, or a CSV of images with labels "
        "and/or captions (default: digits)",
    )
    p.add_argument("--no-representations", action="store_true", help="skip CKA, zero-shot and retrieval")
    p.add_argument("--no-transfer", action="store_true", help="skip the linear-probe transfer curve")
    p.add_argument("--no-spectral", action="store_true", help="skip singular values of the weight matrices (faster)")
    p.add_argument(
        "--model-config",
        metavar="FILE",
        help="open_clip model config JSON, if the stored metadata's model name is not in open_clip's registry",
    )
    p.add_argument(
        "--with",
        dest="with_sections",
        action="append",
        choices=("averages", "interpolation", "optimizer", "plasticity", "all"),
        default=[],
        metavar="SECTION",
        help="also run and show averages, interpolation, optimizer or plasticity (repeatable; 'all': every one)",
    )
    p.add_argument("--title", help="page title (default: 'Training report: RUN')")
    add_json_arg(p, "every analysis as one object")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ckptstore.analysis.report.run import report_run, summary_line

    out = args.out if args.out or args.json else DEFAULT_OUTPUT
    if out:
        check_output_file(out, "report page")
    store = None if Path(args.run).exists() else get_store(args)
    report = report_run(
        store,
        args.run,
        probe=args.probe,
        representations=not args.no_representations,
        transfer=not args.no_transfer,
        spectral=not args.no_spectral,
        model_config=args.model_config,
        title=args.title,
        progress=progress_bar,
        stage=lambda what: stage(what, "ckpt report"),
        extra=args.with_sections,
        lean_imports=True,  # this process builds no other open_clip model
    )
    for section, why in report.skipped.items():
        if not why.startswith("skipped (--no-"):
            print(f"ckpt report: no {section}: {why}", file=sys.stderr)
    for note in report.notes.values():
        print(f"ckpt report: {note}", file=sys.stderr)
    blob = report.json()
    if out:
        with stage("figures and page", "ckpt report"):
            path = report.write(out)
        if args.json:
            print(f"ckpt report: wrote {path}", file=sys.stderr)
        else:
            print(path)
            print(summary_line(blob))
    if args.json:
        print_json(blob)
    return 0
