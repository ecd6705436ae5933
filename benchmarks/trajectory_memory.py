"""Benchmark: what an open ``StoreTrajectory`` holds, and the time of a full walk of every weight.

Stores ``--checkpoints`` checkpoints shaped like a CLIP training checkpoint's manifest (``--params`` parameters,
each with AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``: 4 tensors a parameter, 344 for the default 86, as the
real OpenCLIP checkpoints have), then in one process: the Python memory (tracemalloc) and the objects the garbage
collector tracks that the trajectory holds (with it open, less after it is gone: the store's bounded manifest cache
is not counted), the same with the optimizer analysis' additions (``optimizer_states``), and the wall and CPU time
of opening it and of walking every weight through every checkpoint (``iter_tensor``), each ``--repeat`` times with a
fresh Store. To compare two versions of the code, ``--store`` keeps the run and ``--reuse`` reads it again.

    python benchmarks/trajectory_memory.py [--checkpoints 150] [--params 86] [--store DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ckptstore import create_store, open_store
from ckptstore.analysis.optimizer import optimizer_states
from ckptstore.analysis.trajectory import StoreTrajectory


def make(path: Path, checkpoints: int, params: int) -> None:
    rng = np.random.default_rng(0)
    shapes = [(64, 64) if i % 2 == 0 else (64,) for i in range(params)]
    w = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in shapes]
    m1 = [np.zeros(s, np.float32) for s in shapes]
    m2 = [np.zeros(s, np.float32) for s in shapes]
    store = create_store(path)
    for step in range(1, checkpoints + 1):
        for i in range(params):
            g = rng.standard_normal(shapes[i]).astype(np.float32) * 0.01
            m1[i] = (0.9 * m1[i] + 0.1 * g).astype(np.float32)
            m2[i] = (0.999 * m2[i] + 0.001 * g * g).astype(np.float32)
            w[i] = (w[i] - 1e-3 * m1[i] / (np.sqrt(m2[i]) + 1e-8)).astype(np.float32)
        group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
        state = {
            "state_dict": {
                f"module.blocks.{i}.{'weight' if i % 2 == 0 else 'bias'}": w[i].copy() for i in range(params)
            },
            "optimizer": {
                "state": {
                    i: {"step": np.array(float(step), np.float32), "exp_avg": m1[i].copy(), "exp_avg_sq": m2[i].copy()}
                    for i in range(params)
                },
                "param_groups": [  # open_clip_train's: gains and biases first, without weight decay
                    {**group, "weight_decay": 0.0, "params": list(range(1, params, 2))},
                    {**group, "weight_decay": 0.2, "params": list(range(0, params, 2))},
                ],
            },
            "epoch": step,
        }
        store.save("run", step, state, {"epoch": step, "step": step * 10, "metrics": {"loss": 1.0 / step}})
    store.close()


def measure(path: Path, repeat: int) -> dict[str, object]:
    store = open_store(path)
    n = len(store.steps("run"))
    first = store.manifest("run", n)
    size = len(store.storage.read(first.key))
    records = (len(first.tensors), len(first.objects))
    store = open_store(path)
    gc.collect()
    tracemalloc.start()
    traj = StoreTrajectory(store, "run")
    gc.collect()
    with_traj, _ = tracemalloc.get_traced_memory()
    tracked = len(gc.get_objects())
    opts = optimizer_states(traj)
    gc.collect()
    with_opt, _ = tracemalloc.get_traced_memory()
    del traj, opts
    gc.collect()
    without, _ = tracemalloc.get_traced_memory()
    tracked -= len(gc.get_objects())
    tracemalloc.stop()
    opens, walls, cpus = [], [], []
    for _ in range(repeat):
        store = open_store(path)
        t0 = time.perf_counter()
        traj = StoreTrajectory(store, "run")
        opens.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        for name in traj.weight_names():
            for _x in traj.iter_tensor(name):
                pass
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del traj
    return {
        "checkpoints": n,
        "manifest_json_bytes": size,
        "tensors_objects_per_manifest": records,
        "held_per_checkpoint_bytes": round((with_traj - without) / n),
        "held_with_optimizer_states_per_checkpoint_bytes": round((with_opt - without) / n),
        "gc_tracked_by_trajectory": tracked,
        "open_s": [round(t, 3) for t in opens],
        "walk_s": [round(t, 3) for t in walls],
        "walk_cpu_s": [round(t, 3) for t in cpus],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=150)
    ap.add_argument("--params", type=int, default=86)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", type=Path, help="keep the run here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="read the run already at --store")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trajectory-memory-") as tmp:
        path = a.store or Path(tmp) / "s"
        if not a.reuse:
            make(path, a.checkpoints, a.params)
        print(json.dumps(measure(path, a.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
