"""``ckpt analyze weights`` and ``ckpt analyze stability``: weight dynamics and stability flags of a run
(docs/analysis-dynamics.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    emit_result,
    open_run,
    print_table,
    progress_bar,
)
from ckptstore.cli.common import fmt_num as _f


def register(asub: Any) -> None:
    w = asub.add_parser(
        "weights",
        help="norms, distances, cosines, spectra and a PCA map of the weights through the run",
        description="Read every weight tensor of RUN through all its checkpoints (one tensor at a time) and report, "
        "per tensor, per module and for the whole model: norm, distance from the first checkpoint and from the "
        "previous one, relative update size, cosine similarity to the first and the last checkpoint; for matrices "
        "the top singular value, stable rank and effective rank; path length against net displacement; and a 2-D "
        "PCA projection of the trajectory.",
    )
    _common(w)
    w.add_argument("--top", type=int, default=15, metavar="N", help="modules in the table (default 15)")
    w.add_argument("--no-spectral", action="store_true", help="skip singular values of the weight matrices (faster)")
    w.add_argument("--no-pca", action="store_true", help="skip the PCA projection")
    w.add_argument(
        "--group-depth",
        type=int,
        metavar="D",
        help="group tensors into modules by their first D name components (default: the name without its last "
        "component; D=4 groups visual.transformer.resblocks.3.*)",
    )
    w.set_defaults(func=cmd_weights)

    s = asub.add_parser(
        "stability",
        help="flags: loss spikes, NaN/Inf weights, norm blow-ups, update spikes, clamped logit_scale, frozen modules",
        description="Check RUN for loss spikes (from the recorded losses), non-finite weights, norm blow-ups and "
        "update spikes per module, OpenCLIP's logit_scale at its clamp, rank collapse of the projections and "
        "modules that stop moving. Each flag names the checkpoint where the problem first appears and how sure it "
        "is.",
    )
    _common(s)
    s.set_defaults(func=cmd_stability)


def _common(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument(
        "run", nargs="+", metavar="RUN", help="a run of the store, a folder of epoch_N.pt files, or .pt files"
    )
    add_json_arg(p)
    add_out_arg(p, "also write the JSON result to FILE.json (checked before the work)", metavar="FILE.json")


def cmd_weights(args: argparse.Namespace) -> int:
    from ckptstore.analysis.weights import analyze_weights, top_modules

    traj = open_run(args)
    with progress_bar(f"reading {len(traj.weights)} tensors through {len(traj)} checkpoints") as prog:
        dyn = analyze_weights(
            traj, spectral=not args.no_spectral, pca=not args.no_pca, group_depth=args.group_depth, progress=prog
        )
    blob = dyn.to_dict()
    if emit_result(args, blob):
        return 0
    first, last = traj.points[0].label, traj.points[-1].label
    mods = blob["modules"]
    rows = []
    for name, rel in top_modules(blob, args.top):
        m = mods[name]
        dist = m["dist_init"][-1]
        path = sum(v for v in m["dist_prev"][1:] if v is not None)
        rows.append([name, f"{m['numel']:,}", _f(m["norm"][0]), _f(m["norm"][-1]), _f(dist), _f(rel), _f(path),
                     _f(m["cos_init"][-1])])  # fmt: skip
    print_table(
        f"modules that moved most from {first} to {last}, relative to their norm at {first} "
        f"({len(mods)} modules, {len(traj)} checkpoints)",
        ["module", "params", "‖W₀‖", "‖W_T‖", "‖W_T−W₀‖", "relative", "path", "cos(W_T,W₀)"],
        rows,
        justify=["left", *["right"] * 7],
    )
    model = blob["model"]
    print(
        f"model: path length {_f(model['path_length'])}, displacement {_f(model['displacement'])}, "
        f"straightness {_f(model['straightness'], 3)} (1 = a straight line from {first} to {last})"
    )
    pca = blob["pca"]
    if pca:
        r = pca["explained_variance_ratio"]
        shown = ", ".join("-" if v is None else f"{v:.1%}" for v in r)
        how = "exact" if pca["method"] == "exact" else f"count-sketch of {pca['sketch_dim']:,} dimensions"
        print(f"PCA of the trajectory ({how}): the first two components explain {shown} of the variance")
    bad = sum(1 for t in blob["tensors"].values() if any(t["nonfinite"]))
    if bad:
        print(f"warning: {bad} tensors hold NaN/Inf values (see `ckpt analyze stability`)")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from ckptstore.analysis.stability import analyze_stability

    traj = open_run(args)
    with progress_bar(f"reading {len(traj.weights)} tensors through {len(traj)} checkpoints") as prog:
        report = analyze_stability(traj, progress=prog)
    blob = report.to_dict()
    if emit_result(args, blob):
        return 0
    checked = ", ".join(blob["checked"])
    if not blob["flags"]:
        print(f"no flags in {len(traj)} checkpoints (checked: {checked})")
    else:
        rows = [
            [f["label"], f["kind"], f["where"], f["confidence"], f["what"]]
            for f in blob["flags"]
        ]  # fmt: skip
        print_table(
            f"{len(rows)} stability flag{'s' if len(rows) != 1 else ''} in {len(traj)} checkpoints",
            ["first at", "kind", "where", "confidence", "what"],
            rows,
        )
        print(f"checked: {checked}")
    for kind, why in blob["skipped"].items():
        print(f"not checked: {kind}: {why}")
    return 0
