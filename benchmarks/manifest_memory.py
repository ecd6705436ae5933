"""Benchmark: what a Store holds after reading a long run in order, bounded manifest cache against unbounded.

Stores ``--checkpoints`` checkpoints of a state shaped like a small CLIP training checkpoint's manifest (``--tensors``
tensors, each with two AdamW moments: ~1,000 records a manifest, as the 20-epoch demo run's), then in one process,
for the default cache and for an unbounded one: ``iter_load`` of the whole run, ``resolve`` of a metadata selector,
and reports the Python memory still held (tracemalloc), the objects the garbage collector tracks, and the time of a
full collection (what every automatic full pass costs).

    python benchmarks/manifest_memory.py [--checkpoints 300] [--tensors 344]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ckptstore import create_store, open_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=300)
    ap.add_argument("--tensors", type=int, default=344)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="manifest-memory-") as tmp:
        path = Path(tmp) / "s"
        store = create_store(path)
        rng = np.random.default_rng(0)
        for s in range(1, a.checkpoints + 1):
            state = {
                "state_dict": {f"layer{i}.weight": rng.standard_normal(16, dtype=np.float32) for i in range(a.tensors)},
                "optimizer": {
                    "state": {
                        i: {"exp_avg": np.zeros(16, np.float32), "exp_avg_sq": np.full(16, s, np.float32)}
                        for i in range(a.tensors)
                    }
                },
            }
            store.save("run", s, state, {"epoch": s, "metrics": {"loss": 1.0 / s}})
        store.close()
        print(f"{a.checkpoints} checkpoints of {3 * a.tensors} tensors stored", file=sys.stderr)
        for label, records in (("bounded (default)", None), ("unbounded", 1 << 62)):
            gc.collect()
            tracemalloc.start()
            fresh = open_store(path)
            if records is not None:
                fresh._manifests.max_records = records
            t0 = time.perf_counter()
            for _, state in fresh.iter_load("run"):
                del state
            read = time.perf_counter() - t0
            assert fresh.resolve("run@best:metrics.loss:max").step == 1
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            pauses, tracked = [], len(gc.get_objects())
            for _ in range(5):
                t0 = time.perf_counter()
                gc.collect()
                pauses.append(time.perf_counter() - t0)
            print(
                f"{label:<18} manifests parsed {len(fresh._manifests):5d}, Python memory held {held / 1e6:7.1f} MB, "
                f"objects tracked {tracked:9,d}, full collection {statistics.median(pauses) * 1e3:6.1f} ms, "
                f"in-order read {read:.2f} s"
            )
            del fresh
    return 0


if __name__ == "__main__":
    sys.exit(main())
