"""``ckpt analyze representations`` and ``ckpt analyze transfer``: a probe set through every checkpoint of a run
(docs/analysis-representations.md)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    open_run,
    print_json,
    print_table,
    progress_bar,
)

TRANSFER_DIGITS = 500  # the linear probe's default digits set: 350 to train on, 150 to test


def register(asub: Any) -> None:
    p = asub.add_parser(
        "representations",
        help="CKA between checkpoints, zero-shot accuracy, retrieval and effective dimension on a probe set",
        description="Embed a probe set with every checkpoint of RUN (an OpenCLIP run: a store run, a folder of "
        "open_clip_train epoch_N.pt files, or .pt files) and report per checkpoint: zero-shot top-1/top-5 accuracy, "
        "image/text retrieval recall@1/5/10, effective dimension of the embeddings, and linear CKA between "
        "checkpoints for the final embeddings and every transformer block.",
    )
    _common(p)
    p.add_argument(
        "--probe",
        default="digits",
        metavar="digits|CSV",
        help="the built-in digits probe, or a CSV of images with label and/or caption columns (default: digits)",
    )
    p.add_argument("--n", type=int, metavar="N", help="probe images (digits: default 200; CSV: the first N rows)")
    p.add_argument("--no-blocks", action="store_true", help="skip per-block activations and their CKA (faster)")
    p.add_argument(
        "--pooling",
        choices=("mean", "token"),
        default="mean",
        help="how a block's tokens become one vector: their mean (default), or the class / end-of-text token",
    )
    p.set_defaults(func=cmd_representations)

    t = asub.add_parser(
        "transfer",
        help="linear-probe accuracy of each checkpoint's frozen image features",
        description="Fit a logistic-regression probe on each checkpoint's frozen image features of a labelled "
        "dataset (one stratified, seeded train/test split for all) and report train and test accuracy per "
        "checkpoint and the best checkpoint.",
    )
    _common(t)
    t.add_argument(
        "--probe",
        default="digits",
        metavar="digits|CSV",
        help="the labelled probe set: the built-in digits set, or a CSV of images with a label column "
        "(default: digits)",
    )
    t.add_argument(
        "--n", type=int, metavar="N", help=f"images (digits: default {TRANSFER_DIGITS}; CSV: the first N rows)"
    )
    t.add_argument("--test-fraction", type=float, default=0.3, help="share of the images held out (default 0.3)")
    t.add_argument("-C", type=float, default=1.0, dest="C", help="inverse L2 strength of the probe (default 1.0)")
    t.add_argument(
        "--features",
        choices=("embedding", "pre-projection"),
        default="embedding",
        help="the final image embedding (default) or the vision tower's output before the projection",
    )
    t.add_argument("--plot", metavar="FILE.png", help="also draw the accuracy curve")
    t.set_defaults(func=cmd_transfer)


def _common(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument(
        "run", nargs="+", metavar="RUN", help="a run of the store, a folder of epoch_N.pt files, or .pt files"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the digits selection and the split (default 0)")
    p.add_argument(
        "--model-config",
        metavar="FILE",
        help="open_clip model config JSON, if the checkpoints' model name is not in open_clip's registry",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass (default 256)")
    add_json_arg(p)
    add_out_arg(p, "also write the JSON result to FILE.json (checked before the work)", metavar="FILE.json")


def _write(args: argparse.Namespace, blob: dict[str, Any]) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(blob, indent=2) + "\n")


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _step(pt: dict[str, Any]) -> Any:
    return pt["step"] if pt["step"] is not None else "-"


def _at(d: Any, *keys: str) -> list[Any] | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, list) else None


def cmd_representations(args: argparse.Namespace) -> int:
    from ckptstore.analysis.probes import load_probe
    from ckptstore.analysis.representations import analyze_representations

    traj = open_run(args)
    probe = load_probe(args.probe, n=args.n, seed=args.seed)
    with progress_bar(f"embedding {len(probe)} probe images") as prog:
        result = analyze_representations(
            traj,
            probe,
            model_config=args.model_config,
            blocks=not args.no_blocks,
            pooling=args.pooling,
            batch_size=args.batch_size,
            progress=prog,
        )
    blob = result.to_dict()
    _write(args, blob)
    if args.json:
        print_json(blob)
        return 0
    cols = ["checkpoint", "epoch", "step"]
    series: list[tuple[str, list[Any] | None]] = [
        ("zero-shot top1", _at(blob, "zero_shot", "top1")),
        ("top5", _at(blob, "zero_shot", "top5")),
        ("i→t R@1", _at(blob, "retrieval", "image_to_text", "R@1")),
        ("t→i R@1", _at(blob, "retrieval", "text_to_image", "R@1")),
        ("eff. dim img", _at(blob, "effective_dim", "image")),
        ("eff. dim txt", _at(blob, "effective_dim", "text")),
        ("CKA→final img", [row[-1] for row in blob["cka"]["image"]]),
        ("CKA→final txt", [row[-1] for row in blob["cka"]["text"]]),
    ]
    shown = [(name, vals) for name, vals in series if vals is not None]
    rows = []
    for i, pt in enumerate(blob["points"]):
        cells = [pt["label"], _f(pt["epoch"], 0) if pt["epoch"] is not None else "-", _step(pt)]
        cells += [_f(vals[i], 1 if name.startswith("eff.") else 3) for name, vals in shown]
        rows.append(cells)
    pr = blob["probe"]
    title = f"{pr['name']}: {pr['n_images']} images, {pr['n_texts'] or 'class-prompt'} texts ({pr['texts']})"
    print_table(title, cols + [n for n, _ in shown], rows, ["left"] + ["right"] * (len(cols) + len(shown) - 1))
    blocks = blob["cka"].get("blocks") or {}
    t = len(blob["points"])
    if blocks and t > 1:
        picks = sorted({0, t // 2, t - 2})
        print_table(
            f"CKA of each block with {blob['points'][-1]['label']}",
            ["block", *(blob["points"][i]["label"] for i in picks)],
            [[name, *(_f(m[i][-1]) for i in picks)] for name, m in blocks.items()],
            ["left"] + ["right"] * len(picks),
        )
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from ckptstore.analysis.probes import load_probe
    from ckptstore.analysis.transfer import analyze_transfer, plot_transfer

    traj = open_run(args)
    n = args.n if args.n is not None else (TRANSFER_DIGITS if args.probe == "digits" else None)
    dataset = load_probe(args.probe, n=n, seed=args.seed)
    with progress_bar(f"linear probes on {len(dataset)} images") as prog:
        result = analyze_transfer(
            traj,
            dataset,
            test_fraction=args.test_fraction,
            seed=args.seed,
            C=args.C,
            features=args.features,
            model_config=args.model_config,
            batch_size=args.batch_size,
            progress=prog,
        )
    blob = result.to_dict()
    _write(args, blob)
    if args.plot:
        plot_transfer(blob, args.plot)
    if args.json:
        print_json(blob)
        return 0
    best = blob["best"]["index"]
    rows = [
        [
            pt["label"],
            _f(pt["epoch"], 0) if pt["epoch"] is not None else "-",
            _step(pt),
            _f(tr),
            _f(te),
            "best" if i == best else "",
        ]
        for i, (pt, tr, te) in enumerate(zip(blob["points"], blob["train_accuracy"], blob["accuracy"], strict=True))
    ]
    ds = blob["dataset"]
    title = (
        f"linear probe ({blob['probe']['features']}, {blob['probe']['feature_dim']} features) on {ds['name']}: "
        f"{ds['n_train']} train / {ds['n_test']} test, {len(ds['classes'])} classes"
    )
    print_table(
        title,
        ["checkpoint", "epoch", "step", "train acc", "test acc", ""],
        rows,
        ["left", "right", "right", "right", "right", "left"],
    )
    return 0
