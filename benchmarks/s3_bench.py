"""Benchmark: save / load throughput to an S3 server on loopback (moto, in its own process) vs local disk.

The state is a real ~100 MB OpenCLIP training checkpoint (weights + AdamW state of the demo's tiny model, from the
cached demo trajectory), saved as two consecutive checkpoints (a keyframe, then deltas). For each backend:

* ``put`` / ``get``: the storage layer alone, one 100 MB object (multipart upload / parallel ranged download);
* ``save 1``, ``save 2``: ``Store.save`` of epoch 1 (keyframes) and epoch 2 (deltas against epoch 1);
* ``load``: ``Store.load`` of epoch 2 in a fresh Store (S3: read cache off, so every byte crosses the wire);
* ``load (warm cache)``: the same with the local read cache already filled (S3 only);
* ``load_tensor``: the largest tensor of epoch 2 alone (the 25 MB token table), and the bytes it moved.

Throughput is logical (uncompressed) bytes per second of wall time; the median of ``--reps`` runs.

    python benchmarks/s3_bench.py                      # trains the tiny demo run if not cached (~1 min)
    python benchmarks/s3_bench.py --checkpoints DIR    # any folder of open_clip_train epoch_N.pt
    python benchmarks/s3_bench.py --synthetic 100      # 100 MB of random float32, no torch needed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ckptstore import create_store, open_store
from ckptstore.format.tree import flatten
from ckptstore.storage import open_storage
from ckptstore.testing.s3 import MotoS3Server

MB = 1e6


def states_from_checkpoints(folder: Path | None) -> list[Any]:
    from ckptstore.demo.trajectory import ensure_trajectory
    from ckptstore.integrations.openclip import epoch_files, read_checkpoint

    if folder is None:
        folder = ensure_trajectory(epochs=2, size="tiny", n_images=256)
    files = epoch_files(folder)[:2]
    return [read_checkpoint(f) for f in files]


def synthetic_states(mb: int, seed: int = 0) -> list[Any]:
    rng = np.random.default_rng(seed)
    n = int(mb * MB / 4 / 16)
    first = {f"layer{i:02d}": rng.standard_normal(n).astype(np.float32) for i in range(16)}
    second = {k: (v + rng.standard_normal(n).astype(np.float32) * 1e-3).astype(np.float32) for k, v in first.items()}
    return [first, second]


def logical_bytes(state: Any) -> int:
    return sum(leaf.nbytes for leaf in flatten(state)[1].values())


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_backend(
    name: str, location: Callable[[], str], options: dict[str, Any], states: list[Any], reps: int, tensor: str
) -> dict[str, Any]:
    sizes = [logical_bytes(s) for s in states]
    res: dict[str, Any] = {"backend": name}
    blob = np.random.default_rng(1).integers(0, 256, size=int(100 * MB), dtype=np.uint8).tobytes()

    def put() -> Any:
        st = open_storage(location(), **options)
        st.write("blob", blob)
        return st

    t, st = timed(put, reps)
    res["put_MBps"] = len(blob) / MB / t
    t, data = timed(lambda: st.read_range("blob", 0, len(blob)), reps)
    assert data == blob
    res["get_MBps"] = len(blob) / MB / t
    st.close()

    saves: list[list[float]] = [[], []]
    loads, tensor_times, warm = [], [], []
    for _ in range(reps):
        loc = location()
        store = create_store(loc, storage_options=options)
        for i, s in enumerate(states):
            gc.collect()
            t0 = time.perf_counter()
            store.save("bench", i + 1, s, {"epoch": i + 1})
            saves[i].append(time.perf_counter() - t0)
        stored = store.stats("bench")["pack_bytes"]
        store.close()
        cold = {**options, "cache_size": 0} if "://" in loc else options
        reader = open_store(loc, storage_options=cold)
        gc.collect()
        t0 = time.perf_counter()
        reader.load("bench@2")
        loads.append(time.perf_counter() - t0)
        for _ in range(3):  # a short operation: three fresh readers per store
            reader = open_store(loc, storage_options=cold)
            reader.resolve("bench@2")  # the manifest read is not part of what is timed
            gc.collect()
            t0 = time.perf_counter()
            w = reader.load_tensor("bench@2", tensor)
            tensor_times.append(time.perf_counter() - t0)
        moved = getattr(reader.storage, "stats", {}).get("bytes_read")
        m = reader.resolve("bench@2")
        chain_bytes = sum(int(m.objects[o]["length"]) for o in m.chain(m.tensors[tensor]["object"]))
        if "://" in loc:
            filled = open_store(loc, storage_options=options)
            filled.load("bench@2")
            again = open_store(loc, storage_options=options)
            t0 = time.perf_counter()
            again.load("bench@2")
            warm.append(time.perf_counter() - t0)
    res.update(
        logical_MB=[round(s / MB, 1) for s in sizes],
        stored_MB=round(stored / MB, 1),
        save1_s=statistics.median(saves[0]),
        save2_s=statistics.median(saves[1]),
        save1_MBps=sizes[0] / MB / statistics.median(saves[0]),
        save2_MBps=sizes[1] / MB / statistics.median(saves[1]),
        load_s=statistics.median(loads),
        load_MBps=sizes[1] / MB / statistics.median(loads),
        load_tensor_s=statistics.median(tensor_times),
        load_tensor_raw_bytes=int(getattr(w, "nbytes", 0)),
        load_tensor_stored_bytes=chain_bytes,
        load_tensor_bytes_moved=moved,
    )
    if warm:
        res["load_warm_s"] = statistics.median(warm)
        res["load_warm_MBps"] = sizes[1] / MB / statistics.median(warm)
    return res


def pick_tensor(state: Any) -> str:
    leaves = flatten(state)[1]
    return max((n for n in leaves if n.startswith("state_dict/")), key=lambda n: leaves[n].nbytes, default=None) or max(
        leaves, key=lambda n: leaves[n].nbytes
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, help="folder of epoch_N.pt (default: the demo's tiny run, cached)")
    ap.add_argument("--synthetic", type=int, metavar="MB", help="random float32 state of this size instead")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    states = synthetic_states(args.synthetic) if args.synthetic else states_from_checkpoints(args.checkpoints)
    tensor = pick_tensor(states[-1])
    work = Path(tempfile.mkdtemp(prefix="s3bench-", dir=args.workdir))
    results = []
    try:
        results.append(bench_backend("local disk", lambda: str(work / uuid.uuid4().hex), {}, states, args.reps, tensor))
        with MotoS3Server(process=True) as server:
            server.create_bucket("bench")
            opts = server.storage_options(cache_dir=str(work / "cache"))
            results.append(
                bench_backend(
                    "S3 (moto, loopback)", lambda: f"s3://bench/{uuid.uuid4().hex}", opts, states, args.reps, tensor
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "tensor": tensor, "reps": args.reps}  # fmt: skip
    print(f"state: {results[0]['logical_MB']} MB logical per checkpoint, stored {results[0]['stored_MB']} MB; "
          f"{env['cpus']} CPUs; median of {args.reps}")  # fmt: skip
    rows = [
        ("put 100 MB object", "put_MBps", "MB/s"),
        ("get 100 MB object", "get_MBps", "MB/s"),
        ("save epoch 1 (keyframes)", "save1_MBps", "MB/s"),
        ("save epoch 2 (deltas)", "save2_MBps", "MB/s"),
        ("load epoch 2 (cold)", "load_MBps", "MB/s"),
        ("load epoch 2 (warm read cache)", "load_warm_MBps", "MB/s"),
        ("load_tensor (one tensor)", "load_tensor_s", "s"),
    ]
    print(f"{'':34}" + "".join(f"{r['backend']:>22}" for r in results))
    for label, key, unit in rows:
        cells = "".join(f"{r[key]:>18.{3 if unit == 's' else 0}f} {unit:<3}" if key in r else f"{'-':>22}"
                        for r in results)  # fmt: skip
        print(f"{label:34}{cells}")
    s3 = results[1]
    print(f"load_tensor({tensor}): raw {s3['load_tensor_raw_bytes']} B, stored {s3['load_tensor_stored_bytes']} B, "
          f"moved from S3 {s3['load_tensor_bytes_moved']} B (manifest included)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
