"""Benchmark: saving and loading checkpoints made of many tiny tensors (norms, biases, optimizer step counters),
where the per-tensor work is nearly all Python, against torch.save / torch.load of the same states.

Stores ``--checkpoints`` checkpoints of ``--tensors`` weights of ``--elements`` float32 each, plus an AdamW-like
state (two moments and a scalar step each), in a fresh store and as ``epoch_N.pt`` files, timing each save against
torch.save of the same state; then, alternating, medians of ``--reps``: every checkpoint in order (streamed: each
let go of before the next) and single loads of three checkpoints, fresh Store each time, with ``threads`` 1 and
2, and torch.load of the same files.

    python benchmarks/small_tensors_bench.py [--checkpoints 30] [--tensors 344] [--elements 16] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ckptstore import create_store, open_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=30)
    ap.add_argument("--tensors", type=int, default=344)
    ap.add_argument("--elements", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="small-tensors-") as tmp:
        root = Path(tmp)
        store = create_store(root / "s", threads=2)
        rng = np.random.default_rng(0)
        files = []
        saves: dict[str, list[float]] = {"ours": [], "torch": []}
        for s in range(1, a.checkpoints + 1):
            state = {
                "state_dict": {
                    f"layer{i}.weight": torch.from_numpy(rng.standard_normal(a.elements, dtype=np.float32))
                    for i in range(a.tensors)
                },
                "optimizer": {
                    "state": {
                        i: {
                            "exp_avg": torch.zeros(a.elements),
                            "exp_avg_sq": torch.full((a.elements,), float(s)),
                            "step": torch.tensor(float(s)),
                        }
                        for i in range(a.tensors)
                    }
                },
            }
            t0 = time.perf_counter()
            store.save("run", s, state)
            saves["ours"].append(time.perf_counter() - t0)
            files.append(root / f"epoch_{s}.pt")
            t0 = time.perf_counter()
            torch.save(state, files[-1])
            saves["torch"].append(time.perf_counter() - t0)
        store.close()
        n = 4 * a.tensors
        print(f"{a.checkpoints} checkpoints of {n} tensors ({a.elements} elements)", file=sys.stderr)
        ours_save, torch_save = statistics.median(saves["ours"][1:]), statistics.median(saves["torch"][1:])
        print(
            f"save, threads=2        {ours_save * 1e3:7.1f} ms per checkpoint  ({ours_save / torch_save:.2f}x "
            f"torch.save, {torch_save * 1e3:.1f} ms; medians after the first)"
        )
        picks = [a.checkpoints // 3, 2 * a.checkpoints // 3, a.checkpoints]

        def ours_order(threads: int) -> None:
            for _, state in open_store(root / "s", threads=threads).iter_load("run"):
                del state

        def ours_single(threads: int) -> None:
            for s in picks:
                open_store(root / "s", threads=threads).load(f"run@{s}")

        def torch_order() -> None:
            for f in files:
                state = torch.load(f, weights_only=True)
                del state

        def torch_single() -> None:
            for s in picks:
                torch.load(files[s - 1], weights_only=True)

        cases = {
            "in order, threads=1": lambda: ours_order(1),
            "in order, threads=2": lambda: ours_order(2),
            "in order, torch.load": torch_order,
            "single, threads=1": lambda: ours_single(1),
            "single, threads=2": lambda: ours_single(2),
            "single, torch.load": torch_single,
        }
        for fn in cases.values():  # warm the page cache and the imports
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(a.reps):
            for k in list(cases) if r % 2 == 0 else list(reversed(cases)):
                t0 = time.perf_counter()
                cases[k]()
                times[k].append(time.perf_counter() - t0)
        per = {"in order": a.checkpoints, "single": len(picks)}
        for k, v in times.items():
            each = statistics.median(v) / per[k.split(",")[0]] * 1e3
            ref = statistics.median(times[k.split(",")[0] + ", torch.load"]) / per[k.split(",")[0]] * 1e3
            print(f"{k:<22} {each:7.1f} ms per checkpoint  ({each / ref:.2f}x torch.load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
