"""``ckpt average``: store the average of chosen checkpoints of a run as a new checkpoint
(docs/analysis-averages.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli.common import (
    add_json_arg,
    add_out_arg,
    add_store_arg,
    check_output_file,
    emit_result,
    get_store,
    progress_bar,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "average",
        help="store a weight average of checkpoints (LAWA of the last K, a soup of chosen ones, an EMA)",
        description="Average the model weights of checkpoints of RUN, tensor by tensor in float64, cast back to "
        "each tensor's dtype, and store the result as a new checkpoint: run RUN-lawaK, RUN-soupN or RUN-emaDECAY "
        "(or --name), at the step of the last checkpoint averaged, with the recipe in its metadata under "
        "'average'. Optimizer state is not carried over; integer buffers come from the last checkpoint averaged. "
        "An existing checkpoint is never overwritten.",
    )
    add_store_arg(p)
    p.add_argument("run", metavar="RUN", help="the store run to average")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, metavar="K", help="the last K checkpoints (LAWA)")
    which.add_argument("--refs", nargs="+", metavar="REF", help="these checkpoints (RUN@STEP, or STEP of RUN)")
    p.add_argument("--ema", type=float, metavar="DECAY", help="an exponential moving average with this decay "
                   "over the chosen checkpoints, oldest first, instead of a uniform average")  # fmt: skip
    p.add_argument("--name", metavar="RUN", help="the run to store the average in (default: see above)")
    add_json_arg(p, "the stored checkpoint and its recipe")
    add_out_arg(p, "also write that JSON to FILE.json (checked before the work)", metavar="FILE.json")
    p.set_defaults(func=cmd_average)


def cmd_average(args: argparse.Namespace) -> int:
    from ckptstore.analysis.averages import average_checkpoints

    if args.out:
        check_output_file(args.out)
    store = get_store(args)
    with progress_bar("averaging tensors") as prog:
        info = average_checkpoints(
            store, args.run, last=args.last, refs=args.refs, ema=args.ema, name=args.name, progress=prog
        )
    blob: dict[str, Any] = {"ref": info.ref, "average": store.resolve(info.ref).metadata["average"]}
    if emit_result(args, blob):
        return 0
    avg = blob["average"]
    how = f"EMA (decay {avg['decay']:g})" if avg["kind"] == "ema" else "uniform average"
    print(f"{info.ref}: {how} of {len(avg['refs'])} checkpoints ({avg['refs'][0]} .. {avg['refs'][-1]})")
    return 0
