"""``ckpt report``: run the analyses that apply to a run and write one self-contained HTML page (docs/report.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptstore.cli.common import add_store_arg, get_store, print_json, progress_bar
from ckptstore.errors import CkptStoreError

if TYPE_CHECKING:
    from ckptstore.analysis.trajectory import Trajectory

DEFAULT_OUTPUT = "report.html"
# Weight names every open_clip CLIP model has (after ``module.`` is stripped): a vision tower and a text tower.
_CLIP_MARKERS = (("visual.",), ("token_embedding.weight", "text.token_embedding.weight"))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write an HTML report of a run: curves, weight dynamics, CKA, transfer, stability flags",
        description="Analyse RUN (a run of the store, or a folder of open_clip_train epoch_N.pt files) and write "
        "one self-contained HTML page: metric curves, per-module distance from initialisation, PCA trajectory, "
        "CKA heat maps, zero-shot / retrieval / transfer curves and stability flags. Representations and transfer "
        "need an OpenCLIP run whose model can be built; otherwise the page says why they are missing.",
    )
    add_store_arg(p, short_option=False)  # -o is the output file here; --storage-option keeps its long form
    p.add_argument("run", help="the run to report on (or a folder of epoch_N.pt files)")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help=f"the HTML page to write (default: {DEFAULT_OUTPUT}; with --json, only when given)",
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
    p.add_argument("--json", action="store_true", help="print every analysis as one JSON object")
    p.set_defaults(func=cmd_report)


# ------------------------------------------------------------------------------------------------ steps


def open_run(args: argparse.Namespace) -> Trajectory:
    """A folder or ``.pt`` file given as RUN is read from disk; anything else is a run of the store."""
    from ckptstore.analysis.trajectory import StoreTrajectory, open_trajectory

    if Path(args.run).exists():
        return open_trajectory(args.run)
    return StoreTrajectory(get_store(args), args.run)


def clip_model_config(traj: Trajectory, given: str | None) -> dict[str, Any]:
    """The open_clip config to build the run's model with, or a :class:`CkptStoreError` saying why there is none."""
    from ckptstore.analysis.representations import RepresentationError, model_config_for

    names = traj.weight_names()
    for options in _CLIP_MARKERS:
        if not any(n.startswith(o) for n in names for o in options):
            raise RepresentationError(
                "not an OpenCLIP model (no vision tower 'visual.*' and text tower 'token_embedding' among its weights)",
                hint="representations and transfer need an open_clip CLIP model",
            )
    cfg, _source = model_config_for(traj.points[0], given)
    return cfg


def run_analyses(args: argparse.Namespace, traj: Trajectory) -> tuple[dict[str, Any], dict[str, str]]:
    """Each analysis that applies, as its ``to_dict()``; and, for each one not run, the reason.

    Representations and transfer need the run's model: an OpenCLIP CLIP model whose config can be found. When it
    cannot, both are skipped with the reason. Both use the ``--probe`` set (transfer: a linear probe on a seeded,
    stratified split of its labelled images). A probe that cannot be read is an error (the user asked for it).
    """
    from ckptstore.analysis.stability import analyze_stability
    from ckptstore.analysis.weights import analyze_weights

    skipped: dict[str, str] = {}
    with progress_bar("weights") as prog:
        weights = analyze_weights(traj, spectral=not args.no_spectral, progress=prog)

    cfg: dict[str, Any] | None = None
    if not (args.no_representations and args.no_transfer):
        try:
            cfg = clip_model_config(traj, args.model_config)
        except CkptStoreError as exc:
            for section in ("representations", "transfer"):
                skipped[section] = str(exc)
    if args.no_representations:
        skipped["representations"] = "skipped (--no-representations)"
    if args.no_transfer:
        skipped["transfer"] = "skipped (--no-transfer)"

    probe = None
    if "representations" not in skipped or "transfer" not in skipped:
        from ckptstore.analysis.probes import load_probe

        probe = load_probe(args.probe)

    representations = None
    if probe is not None and "representations" not in skipped:
        from ckptstore.analysis.representations import analyze_representations

        with progress_bar("representations") as prog:
            representations = analyze_representations(traj, probe, model_config=cfg, progress=prog)

    transfer = None
    if probe is not None and "transfer" not in skipped:
        from ckptstore.analysis.transfer import TransferError, analyze_transfer

        try:
            with progress_bar("transfer") as prog:
                transfer = analyze_transfer(traj, probe, model_config=cfg, progress=prog)
        except TransferError as exc:  # e.g. a probe CSV without labels: the page says so, the rest still helps
            skipped["transfer"] = str(exc)

    results: dict[str, Any] = {"weights": weights.to_dict()}
    if representations is not None:
        results["representations"] = representations.to_dict()
    if transfer is not None:
        results["transfer"] = transfer.to_dict()
    # Stability reads the weight series (not recomputed) and the embeddings' effective dimension.
    stability = analyze_stability(traj, weights=weights, representations=results.get("representations"))
    results["stability"] = stability.to_dict()
    return results, skipped


def summary_line(blob: Mapping[str, Any]) -> str:
    """One line: the run, how many checkpoints, what was analysed, flags, best transfer checkpoint."""
    bits = [f"{blob['run']}: {len(blob['points'])} checkpoints"]
    stab = blob.get("stability")
    if stab:
        flags = stab.get("flags") or []
        high = sum(1 for f in flags if f.get("confidence") == "high")
        bits.append(
            f"{len(flags)} stability flag{'s' if len(flags) != 1 else ''}" + (f" ({high} high)" if high else "")
        )
    tr = blob.get("transfer")
    best = (tr or {}).get("best") or {}
    if isinstance(best.get("accuracy"), int | float):
        bits.append(f"best transfer accuracy {best['accuracy']:.3f} at {best.get('label')}")
    done = [k for k in ("weights", "representations", "transfer", "stability") if blob.get(k) is not None]
    bits.append("analysed: " + ", ".join(done))
    if blob.get("skipped"):
        bits.append("skipped: " + ", ".join(blob["skipped"]))
    return "; ".join(bits)


def cmd_report(args: argparse.Namespace) -> int:
    from ckptstore.analysis.report import report_json

    traj = open_run(args)
    results, skipped = run_analyses(args, traj)
    for section, why in skipped.items():
        if not why.startswith("skipped (--no-"):
            print(f"ckpt report: no {section}: {why}", file=sys.stderr)
    kwargs: dict[str, Any] = {**results, "title": args.title, "skipped": skipped}
    if args.with_sections:
        from ckptstore.cli.analyze_landscape import report_sections

        kwargs["extra"] = report_sections(args, traj)
    blob = report_json(traj, **kwargs)
    out = args.output if args.output or args.json else DEFAULT_OUTPUT
    if out:
        from ckptstore.analysis.report import write_report

        path = write_report(traj, out, **kwargs)
        if args.json:
            print(f"ckpt report: wrote {path}", file=sys.stderr)
        else:
            print(path)
            print(summary_line(blob))
    if args.json:
        print_json(blob)
    return 0
