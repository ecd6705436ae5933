"""Benchmark: an in-order read that keeps every state, in one long process, alternating with torch.load's, with
the page faults each pass takes.

Why: a pass that keeps all twenty states of the benchmark run hands out 2 GB. Whether that comes from memory the
process freed before (no page faults) or from fresh pages (a zeroed page per 4 KB fault) is what separated our
pass from torch.load's in ``load_bench.py``'s long process (docs/benchmarks.md, "The buffers taken on the
caller's thread"). This prints each pass's wall time, CPU time and minor page faults, ours then torch.load's,
``--pairs`` times, and the medians from the second pair on (the first pair takes fresh memory on both sides).

    python benchmarks/in_order_faults.py --store DIR --run RUN --checkpoints DIR [--pairs 6] [--streamed]

The store is any store holding the ``epoch_N.pt`` files of ``--checkpoints`` as the run's checkpoints in step
order (``ckpt ingest`` builds one). ``--streamed`` lets go of each checkpoint before the next, on both sides.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ckptstore import open_store
from ckptstore.integrations.openclip import epoch_files


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="store holding the run")
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoints", type=Path, required=True, help="folder of the run's epoch_N.pt")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--streamed", action="store_true", help="let go of each checkpoint before the next")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    files = epoch_files(a.checkpoints)
    if len(open_store(a.store).steps(a.run)) != len(files):
        ap.error(f"run {a.run!r} of {a.store} does not hold one checkpoint per epoch_N.pt of {a.checkpoints}")

    def ours() -> Any:
        states = (x for _, x in open_store(a.store, threads=2).iter_load(a.run))
        return _consume(states) if a.streamed else list(states)

    def theirs() -> Any:
        states = (torch.load(p, weights_only=True) for p in files)
        return _consume(states) if a.streamed else list(states)

    passes: dict[str, list[dict[str, float]]] = {"ours": [], "torch": []}
    for i in range(a.pairs):
        for side, read in (("ours", ours), ("torch", theirs)):
            f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
            out = read()
            one = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "faults": _faults() - f0}
            del out
            passes[side].append(one)
            print(f"pair {i}: {side:<5} wall {one['wall']:.3f} s  cpu {one['cpu']:.3f} s  faults {one['faults']:,.0f}")
    med = {
        s: {k: statistics.median(p[k] for p in v[1:] or v) for k in ("wall", "cpu", "faults")}
        for s, v in passes.items()
    }
    ratio = med["ours"]["wall"] / med["torch"]["wall"]
    form = "streamed" if a.streamed else "kept"
    print(
        f"{form}, medians from pair 1 on: ours {med['ours']['wall']:.3f} s ({med['ours']['faults']:,.0f} faults), "
        f"torch.load {med['torch']['wall']:.3f} s ({med['torch']['faults']:,.0f} faults) = {ratio:.2f}x"
    )
    if a.json:
        a.json.write_text(json.dumps({"form": form, "passes": passes, "medians": med, "ratio": ratio}, indent=2))
    return 0


def _consume(states: Any) -> None:
    for state in states:
        del state


if __name__ == "__main__":
    sys.exit(main())
