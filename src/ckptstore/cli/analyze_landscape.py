"""``ckpt analyze averages | interpolation | optimizer | plasticity``: weight averages, loss barriers, optimizer
state and plasticity of a run (docs/analysis-averages.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    check_output_file,
    emit_result,
    get_store,
    print_table,
    progress_bar,
    storage_options,
)
from ckptstore.cli.common import fmt_num as _f


def _outputs(p: argparse.ArgumentParser) -> None:
    add_json_arg(p, "the result (no tables)")
    add_out_arg(p, "also write the JSON result to FILE.json (checked before the work)", metavar="FILE.json")


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", default="digits", metavar="digits|CSV",
                   help="the built-in digits probe, or a CSV of labelled images (default: digits)")  # fmt: skip
    p.add_argument("--n", type=int, metavar="N", help="probe images (digits: default 200; CSV: the first N rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the digits selection (default 0)")
    p.add_argument("--model-config", metavar="FILE", help="open_clip model config JSON, if the checkpoints' model "
                   "name is not in open_clip's registry")  # fmt: skip


def _dask_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run one task per tensor on the Dask scheduler at ADDRESS (tcp://host:8786), or 'local' for a "
        "LocalCluster of 2 workers; the workers read the store URL",
    )


def _checked(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The command, after its ``--out`` path is checked: a bad path fails before minutes of work, not after."""

    def run(args: argparse.Namespace) -> int:
        if args.out:
            check_output_file(args.out)
        return cmd(args)

    return run


def register(asub: Any) -> None:
    a = asub.add_parser(
        "averages",
        help="the last checkpoint against LAWA of the last k and an EMA, on a probe",
        description="Average the last k checkpoints of RUN (LAWA, for each --k) and take an EMA over the whole run "
        "(in memory; nothing is stored: `ckpt average` stores one), and compare them with the last checkpoint: "
        "zero-shot loss and top-1/top-5 accuracy of an OpenCLIP run on the probe set.",
    )
    add_store_arg(a)
    a.add_argument("run", metavar="RUN", help="a store run")
    a.add_argument("--k", type=int, action="append", metavar="K", help="LAWA over the last K (repeatable; "
                   "default 2 and 5)")  # fmt: skip
    a.add_argument("--ema", type=float, default=0.9, metavar="DECAY", help="EMA decay (default 0.9)")
    _probe_args(a)
    _outputs(a)
    a.set_defaults(func=_checked(cmd_averages))

    i = asub.add_parser(
        "interpolation",
        help="loss and zero-shot accuracy along the line between checkpoints, and the barrier height",
        description="Evaluate (1-a)*A + a*B for --points values of a in [0, 1] between checkpoints A and B (or "
        "every pair of the references given) on a probe set: zero-shot loss and accuracy, and the barrier (the "
        "largest rise of the loss above the straight line between its ends). Several pairs give a matrix.",
    )
    add_store_arg(i)
    i.add_argument("refs", nargs="+", metavar="REF", help="two or more checkpoints (RUN@STEP, ...)")
    i.add_argument("--points", type=int, default=11, help="points along each line, ends included (default 11)")
    i.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass (default 256)")
    _probe_args(i)
    _outputs(i)
    i.set_defaults(func=_checked(cmd_interpolation))

    o = asub.add_parser(
        "optimizer",
        help="per-tensor relative update, Adam effective step, second-moment health, update spikes",
        description="Read every weight tensor of RUN and its Adam/AdamW state through the run: relative update "
        "|dW|/|W| per checkpoint, the effective step lr/(sqrt(v_hat)+eps) (bias-corrected with the stored step), "
        "the fraction of second-moment entries near zero or exploding, and update spikes.",
    )
    add_store_arg(o)
    o.add_argument("run", metavar="RUN", help="a store run saved with its optimizer state")
    o.add_argument("--top", type=int, default=15, metavar="N", help="tensors in the table (default 15)")
    o.add_argument("--spike", type=float, default=5.0, help="a spike: an update above this multiple of the "
                   "tensor's median update (default 5)")  # fmt: skip
    o.add_argument("--explode", type=float, default=1e3, help="exploding v: sqrt(v_hat) above this multiple of "
                   "the tensor's median (default 1000)")  # fmt: skip
    _dask_arg(o)
    _outputs(o)
    o.set_defaults(func=_checked(cmd_optimizer))

    p = asub.add_parser(
        "plasticity",
        help="dormant units per layer, stable and effective rank, weight growth",
        description="Per checkpoint of RUN: tau-dormant hidden units of every transformer MLP on the probe set "
        "(Sokar et al.), and per weight matrix its stable rank, effective rank and norm growth.",
    )
    add_store_arg(p)
    p.add_argument("run", metavar="RUN", help="a store run")
    p.add_argument("--tau", type=float, default=0.025, help="dormant threshold on the normalised mean |activation| "
                   "(default 0.025)")  # fmt: skip
    p.add_argument("--no-dormant", action="store_true", help="skip the activations (weights only; any model)")
    p.add_argument("--no-spectral", action="store_true", help="skip the ranks (faster)")
    p.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass (default 256)")
    _probe_args(p)
    _dask_arg(p)
    _outputs(p)
    p.set_defaults(func=_checked(cmd_plasticity))


def _probe(args: argparse.Namespace) -> Any:
    from ckptstore.analysis.probes import load_probe

    return load_probe(args.probe, n=args.n, seed=args.seed)


def cmd_averages(args: argparse.Namespace) -> int:
    from ckptstore.analysis.averages import analyze_averages

    with progress_bar("evaluating averages") as prog:
        blob = analyze_averages(
            get_store(args), args.run, ks=args.k or (2, 5), ema=args.ema, probe=_probe(args),
            model_config=args.model_config, progress=prog,
        )  # fmt: skip
    if emit_result(args, blob):
        return 0
    rows = [[c["name"], f"{c['refs'][0]} .. {c['refs'][-1]}" if len(c["refs"]) > 1 else c["refs"][0],
             _f(c.get("loss")), _f(c.get("top1"), 3), _f(c.get("top5"), 3)] for c in blob["candidates"]]  # fmt: skip
    print_table(f"averages of {args.run}", ["candidate", "checkpoints", "loss", "top1", "top5"], rows)
    print("best: " + ", ".join(f"{k} {v}" for k, v in blob["best"].items()))
    return 0


def cmd_interpolation(args: argparse.Namespace) -> int:
    from ckptstore.analysis.interpolation import analyze_interpolation
    from ckptstore.analysis.trajectory import StoreTrajectory, TrajectoryError

    if len(args.refs) < 2:
        raise TrajectoryError("interpolation needs two checkpoints", hint="give RUN@A RUN@B")
    store = get_store(args)
    traj = StoreTrajectory(store, args.refs[0].split("@")[0], args.refs)
    with progress_bar("evaluating along the lines") as prog:
        res = analyze_interpolation(
            traj, points=args.points, probe=_probe(args), model_config=args.model_config, progress=prog
        )
    blob = res.to_dict()
    if emit_result(args, blob):
        return 0
    for path in blob["paths"]:
        m = path["metrics"]
        rows = [[f"{a:.2f}", _f(m["loss"][k]), _f(m.get("top1", [None] * len(blob["alphas"]))[k], 3)]
                for k, a in enumerate(blob["alphas"])]  # fmt: skip
        a_label, b_label = path["labels"]
        print_table(f"{a_label} -> {b_label}", ["alpha", "loss", "top1"], rows, justify=["right"] * 3)
        bar = path["barrier"]
        print(f"loss barrier {_f(bar['loss'])}, accuracy barrier {_f(bar.get('top1'), 3)}")
    if len(blob["points"]) > 2:
        labels = [p["label"] for p in blob["points"]]
        mat = blob["barrier_matrix"]["loss"]
        print_table("loss barrier matrix", ["", *labels], [[labels[r], *map(_f, row)] for r, row in enumerate(mat)])
    return 0


def _dask_address(args: argparse.Namespace) -> Any:
    if args.dask != "local":
        return args.dask
    from distributed import Client, LocalCluster

    return Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None))


def cmd_optimizer(args: argparse.Namespace) -> int:
    from ckptstore.analysis.optimizer import OptimizerThresholds, analyze_optimizer
    from ckptstore.analysis.trajectory import StoreTrajectory

    th = OptimizerThresholds(explode=args.explode, spike=args.spike)
    with progress_bar("reading tensors and optimizer state") as prog:
        if args.dask:
            from ckptstore.analysis.distributed import analyze_on_dask

            rep = analyze_on_dask("optimizer", args.store, args.run, address=_dask_address(args),
                                  storage_options=storage_options(args), thresholds=th, progress=prog)  # fmt: skip
        else:
            rep = analyze_optimizer(StoreTrajectory(get_store(args), args.run), thresholds=th, progress=prog)
    blob = rep.to_dict()
    if emit_result(args, blob):
        return 0
    last = len(blob["points"]) - 1
    ranked = sorted(blob["tensors"].items(), key=lambda kv: -(kv[1]["rel_update"][last] or 0.0))[: args.top]
    rows = []
    for name, t in ranked:
        eff = t.get("eff_step", {})
        rows.append([name, _f(t["rel_update"][last]), _f((eff.get("median") or [None])[last]),
                     _f((eff.get("max") or [None])[last]), _f((t.get("v_near_zero") or [None])[last], 3),
                     _f((t.get("v_exploding") or [None])[last], 3)])  # fmt: skip
    label = blob["points"][last]["label"]
    print_table(f"largest relative updates at {label} (parameter matching: {blob['mapping']})",
                ["tensor", "|dW|/|W|", "eff. step median", "eff. step max", "v~0", "v exploding"], rows,
                justify=["left", *["right"] * 5])  # fmt: skip
    print(f"model relative update at {label}: {_f(blob['model']['rel_update'][last])}; "
          f"{len(blob['spikes'])} update spike(s)")  # fmt: skip
    for s in blob["spikes"][:10]:
        print(f"  spike: {s['tensor']} at {s['label']}: {_f(s['rel_update'])} (median {_f(s['median'])})")
    return 0


def cmd_plasticity(args: argparse.Namespace) -> int:
    from ckptstore.analysis.plasticity import analyze_plasticity
    from ckptstore.analysis.trajectory import StoreTrajectory

    with progress_bar("reading tensors (and activations)") as prog:
        if args.dask:
            from ckptstore.analysis.distributed import analyze_on_dask

            rep = analyze_on_dask("plasticity", args.store, args.run, address=_dask_address(args),
                                  storage_options=storage_options(args), spectral=not args.no_spectral,
                                  progress=prog)  # fmt: skip
        else:
            rep = analyze_plasticity(
                StoreTrajectory(get_store(args), args.run), probe=None if args.no_dormant else _probe(args),
                tau=args.tau, dormant=not args.no_dormant, spectral=not args.no_spectral,
                model_config=args.model_config, batch_size=args.batch_size, progress=prog,
            )  # fmt: skip
    blob = rep.to_dict()
    if emit_result(args, blob):
        return 0
    labels = [p["label"] for p in blob["points"]]
    if blob["dormant"]:
        rows = [[name, d["units"], *[f"{c}" for c in d["count"]]] for name, d in blob["dormant"].items()]
        tot = blob["dormant_total"]
        rows.append(["all", tot["units"], *[str(c) for c in tot["count"]]])
        print_table(f"tau-dormant units (tau = {blob['tau']})", ["layer", "units", *labels], rows)
    mats = [(n, w) for n, w in blob["weights"].items() if "stable_rank" in w]
    rows = [[n, _f(w["stable_rank"][0]), _f(w["stable_rank"][-1]), _f(w["effective_rank"][0]),
             _f(w["effective_rank"][-1]), _f(w["growth"][-1])] for n, w in mats]  # fmt: skip
    if rows:
        print_table(f"weight matrices, {labels[0]} -> {labels[-1]}",
                    ["tensor", "stable rank", "", "effective rank", "", "norm growth"], rows,
                    justify=["left", *["right"] * 5])  # fmt: skip
    return 0
