"""Weights-only tier on a real open_clip_train trajectory: store epochs 1..N, thin with ``--keep last:2
--keep-weights all``, and report the bytes freed, bit-exactness of every remaining tensor against the trainer's
``epoch_N.pt`` and ``ckpt verify``.

    PYTHONPATH=src python benchmarks/weights_only_bench.py [--epochs 10] [--json OUT]

Uses the cached 20-epoch trajectory (``ckptstore.demo.trajectory.ensure_trajectory``; trained once, ~2 min).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ckptstore.demo import trajectory as tj
from ckptstore.format import tree
from ckptstore.integrations import openclip
from ckptstore.policy import thin
from ckptstore.store import create_store
from ckptstore.torch import load_pt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--keep", default="last:2")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    ckpts = tj.ensure_trajectory(epochs=20, size="tiny", n_images=128)
    files = openclip.epoch_files(ckpts)[: args.epochs]
    raw = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory() as d:
        store = create_store(Path(d) / "s.ckpt")
        t0 = time.perf_counter()
        openclip.ingest(store, [str(f) for f in files], run="r")
        t_ingest = time.perf_counter() - t0
        before = store.stats("r")["pack_bytes"]
        opt_logical = 0
        for f in files:
            _, leaves = tree.flatten(load_pt(str(f)))
            opt_logical += sum(lf.nbytes for n, lf in leaves.items() if n.startswith("optimizer/"))
        t0 = time.perf_counter()
        the_plan, recs = thin.plan_thin(store, "r", args.keep, keep_weights="all")
        res = thin.apply_plan(store, "r", the_plan, recs)
        t_thin = time.perf_counter() - t0
        after = store.stats("r")["pack_bytes"]
        ver = store.verify("r")
        mismatched = 0
        compared = 0
        for f in files:
            _, orig = tree.flatten(load_pt(str(f)))
            m = store.resolve(f"r@{int(f.stem.split('_')[1])}")
            for n, lf in store.load_leaves(m).items():
                compared += 1
                mismatched += lf.data.tobytes() != orig[n].data.tobytes()
            missing_opt = [n for n in orig if n not in m.tensors]
            assert all(n.startswith("optimizer/") for n in missing_opt)
        # what it should free: a store that never held the optimizer state of the thinned checkpoints
        ref_store = create_store(Path(d) / "ref.ckpt")
        slim = {int(r.split("@")[1]) for r in res["weights_only"]}
        for f in files:
            e = int(f.stem.split("_")[1])
            state = load_pt(str(f))
            if e in slim:
                state = {k: v for k, v in state.items() if k != "optimizer"}
            ref_store.save("r", e, state)
        expected_after = ref_store.stats("r")["pack_bytes"]
        out = {
            "epochs": len(files),
            "raw_pt_bytes": raw,
            "optimizer_logical_bytes": opt_logical,
            "store_bytes_before": before,
            "store_bytes_after": after,
            "store_bytes_never_stored": expected_after,
            "freed_bytes": res["freed_bytes"],
            "weights_only": res["weights_only"],
            "rewritten": res["rewritten"],
            "tensors_compared": compared,
            "tensors_mismatched": mismatched,
            "verify_ok": ver["ok"],
            "ingest_s": round(t_ingest, 1),
            "thin_s": round(t_thin, 1),
            "torch": torch.__version__,
        }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if out["verify_ok"] and not mismatched else 1


if __name__ == "__main__":
    raise SystemExit(main())
