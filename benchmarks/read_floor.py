"""Benchmark: how far a store read is from its compute floor, against torch.load in the same process.

A read of a delta-coded checkpoint has work no implementation of this format can skip: zstd decompression of the
stored planes, the plane join / delta kernels, the content hash every load checks, and the private copies an
in-order read keeps as the next checkpoint's bases. This script times that work *inside* its C calls (thread CPU
time around each call: zstd, the ``_kernels`` functions, xxh3, the copies; ``decode_many`` is the batch decoder's
one call for many small tensors, zstd and kernels together), while a normal read runs, and reports per checkpoint:

- ``wall``: the read as a user runs it (a fresh Store, 2 threads); ``cpu``: the process CPU it used;
- ``c_cpu``: CPU inside those C calls; ``floor = c_cpu / cores``: the wall time of a reader that had no Python,
  no GIL and split that work perfectly over the cores (kernel page zeroing of fresh memory is not counted: reused
  memory avoids it);
- ``rest = cpu - c_cpu``: interpreter, GC, allocation, page faults, locks;
- ``torch``: torch.load of the same ``epoch_N.pt``, alternating with ours, medians over ``--reps``.

``floor / torch`` is the lower bound of the ratio the load targets of issue 11 are stated in, on this many cores
with these stored bytes; ``wall / floor`` says how much of a read is overhead above it. Two reads: every
checkpoint in order (streamed: each let go of before the next) and each single checkpoint alone.

    python benchmarks/read_floor.py --store DIR --run RUN --checkpoints DIR [--reps 3] [--json out.json]

The store is any store holding the ``epoch_N.pt`` files of ``--checkpoints`` as the run's checkpoints in step
order (``benchmarks/load_bench.py`` builds such stores; ``ckpt ingest`` does too).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptstore.codecs.chain as chain_mod
import ckptstore.codecs.delta as delta_mod
import ckptstore.codecs.native as native_mod
import ckptstore.codecs.planes as planes_mod
import ckptstore.store as store_mod
from ckptstore import open_store
from ckptstore.integrations.openclip import epoch_files

_lock = threading.Lock()
_cpu: collections.Counter[str] = collections.Counter()  # ns of thread CPU inside each kind of C call


def _timed_call(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time_ns() - t0
            with _lock:
                _cpu[label] += spent

    return call


class _TimedKernels:
    """The ``_kernels`` module, each function timed."""

    def __init__(self, kernels: Any) -> None:
        self._k = kernels

    def __getattr__(self, name: str) -> Any:
        return _timed_call(getattr(self._k, name), name)


def instrument() -> None:
    """Time the C work of a read: zstd (one call per frame), the kernels, the content hash, the kept copies."""
    planes_mod._decompress_into = _timed_call(planes_mod._decompress_into, "zstd")
    if planes_mod.kernels is not None:
        timed = _TimedKernels(planes_mod.kernels)
        planes_mod.kernels = timed
        delta_mod.kernels = timed
        chain_mod.kernels = timed
        native_mod.kernels = timed  # decode_many: zstd, joins and deltas of a batch of small tensors in one call
    store_mod.object_id = _timed_call(store_mod.object_id, "xxh3")
    store_mod._private_copy = _timed_call(store_mod._private_copy, "copies")


def _measure(read: Callable[[], int]) -> dict[str, Any]:
    """One read: wall, process CPU and C CPU per checkpoint (``read`` returns how many checkpoints it read)."""
    with _lock:
        _cpu.clear()
    c0, t0 = time.process_time(), time.perf_counter()
    n = read()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with _lock:
        parts = {k: v / 1e9 / n for k, v in _cpu.items()}
    return {"wall": wall / n, "cpu": cpu / n, "c_cpu": sum(parts.values()), "c_parts": parts}


def _summary(rows: list[dict[str, Any]], torch_s: list[float], cores: int) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "cpu", "c_cpu")}
    parts = {k: statistics.median(r["c_parts"].get(k, 0.0) for r in rows) for k in rows[0]["c_parts"]}
    t = statistics.median(torch_s)
    floor = med["c_cpu"] / cores
    return {
        **med,
        "c_parts": parts,
        "rest": med["cpu"] - med["c_cpu"],
        "floor": floor,
        "torch": t,
        "ratio": med["wall"] / t,
        "floor_ratio": floor / t,
        "wall_over_floor": med["wall"] / floor if floor else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoints", type=Path, required=True, help="the run's epoch_N.pt files, in step order")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cores = min(a.threads, os.cpu_count() or 1)
    steps = open_store(a.store).steps(a.run)
    files = epoch_files(a.checkpoints)
    if len(files) != len(steps):
        ap.error(f"{a.checkpoints} has {len(files)} checkpoints, run {a.run!r} has {len(steps)}")
    instrument()

    def fresh() -> Any:
        return open_store(a.store, threads=a.threads)

    def ours_in_order() -> int:
        n = 0
        for _, state in fresh().iter_load(a.run):
            n += 1
            del state
        return n

    def torch_in_order() -> float:
        t0 = time.perf_counter()
        for f in files:
            state = torch.load(f, weights_only=True)
            del state
        return (time.perf_counter() - t0) / len(files)

    ours_in_order(), torch_in_order()  # warm: imports, page cache, allocator
    rows, theirs = [], []
    for _ in range(a.reps):
        rows.append(_measure(ours_in_order))
        theirs.append(torch_in_order())
    report: dict[str, Any] = {"cores": cores, "reps": a.reps, "in_order": _summary(rows, theirs, cores)}
    singles = {}
    for s, f in zip(steps, files, strict=True):
        rows, theirs = [], []
        for _ in range(a.reps):
            rows.append(_measure(lambda s=s: (fresh().load(f"{a.run}@{s}"), 1)[1]))
            t0 = time.perf_counter()
            torch.load(f, weights_only=True)
            theirs.append(time.perf_counter() - t0)
        singles[s] = _summary(rows, theirs, cores)
        print(f"  timed {a.run}@{s}", file=sys.stderr)
    report["single"] = singles
    _print(report)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


def _print(rep: dict[str, Any]) -> None:
    def row(label: str, r: dict[str, Any]) -> str:
        ms = {k: r[k] * 1e3 for k in ("wall", "cpu", "c_cpu", "rest", "floor", "torch")}
        return (
            f"{label:>10} {ms['wall']:7.1f} {ms['cpu']:7.1f} {ms['c_cpu']:7.1f} {ms['rest']:7.1f} "
            f"{ms['floor']:7.1f} {ms['torch']:7.1f} {r['ratio']:6.2f}x {r['floor_ratio']:6.2f}x"
        )

    print(f"per checkpoint, ms ({rep['cores']} cores, medians of {rep['reps']})")
    heads = ("wall", "cpu", "c_cpu", "rest", "floor", "torch", "ours", "floor")
    print(f"{'read':>10} " + " ".join(f"{h:>7}" for h in heads))
    print(row("in order", rep["in_order"]))
    parts = ", ".join(
        f"{k} {v * 1e3:.1f}" for k, v in sorted(rep["in_order"]["c_parts"].items(), key=lambda kv: -kv[1])
    )
    print(f"{'':>10} C parts: {parts}")
    for s, r in rep["single"].items():
        print(row(f"@{s}", r))
    single = list(rep["single"].values())[:-1]  # older checkpoints (the newest is the @latest item)
    if single:
        print(
            f"older singles: median {statistics.median(r['ratio'] for r in single):.2f}x torch.load "
            f"(floor {statistics.median(r['floor_ratio'] for r in single):.2f}x), worst "
            f"{max(r['ratio'] for r in single):.2f}x (floor {max(r['floor_ratio'] for r in single):.2f}x)"
        )


if __name__ == "__main__":
    sys.exit(main())
