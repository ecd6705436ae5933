"""Coding throughput on 1 core vs 2 (issue 11 item 4): encode and decode of the large tensors of a real trajectory.

Usage::

    python benchmarks/threads_bench.py --checkpoints DIR [--reps 5] [--json out.json]

DIR holds open_clip_train ``epoch_N.pt`` files. Every tensor of at least ``--min-mb`` MB (default 4) of the last
checkpoint is delta-encoded against the same tensor of the one before (the save path) and decoded back (the load
path; bit-exactness is checked), in a child process pinned with ``os.sched_setaffinity`` first to one core, then
to two. The figure is logical MB/s of the codec itself (the C kernels and zstd release the GIL), medians of
``--reps``; the ratio 2-core / 1-core is what the issue asks for (target ≥ 1.7×).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ckptstore import codecs
from ckptstore.codecs import planes
from ckptstore.format.tree import flatten
from ckptstore.integrations.openclip import epoch_files, read_checkpoint


def _pairs(directory: Path, min_bytes: int) -> list[tuple[str, np.ndarray, np.ndarray, codecs.TensorSpec]]:
    files = epoch_files(directory)[-2:]
    if len(files) < 2:
        raise SystemExit(f"{directory}: need at least two epoch_N.pt files")
    _, prev = flatten(read_checkpoint(files[0]))
    _, cur = flatten(read_checkpoint(files[1]))
    out = []
    for name, leaf in cur.items():
        if leaf.nbytes >= min_bytes and name in prev and prev[name].shape == leaf.shape:
            spec = codecs.TensorSpec(leaf.dtype, leaf.shape)
            out.append((name, np.array(leaf.words), np.array(prev[name].words), spec))
    return out


def _time(fn: Any, reps: int) -> float:
    return statistics.median(_timed(fn) for _ in range(reps))


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(directory: Path, reps: int, min_bytes: int, rounds: int) -> dict[str, Any]:
    """Alternate 1 and 2 cores in one process, ``rounds`` times (the machine's speed drifts between runs: a ratio
    is taken within each round, and the median of those is reported)."""
    cores_all = sorted(os.sched_getaffinity(0))
    if len(cores_all) < 2:
        raise SystemExit(f"only {len(cores_all)} core available: nothing to compare")
    pairs = _pairs(directory, min_bytes)
    mb = sum(w.nbytes for _, w, _, _ in pairs) / 1e6
    encoded = [codecs.encode(w, spec, {"prev": p}) for _, w, p, spec in pairs]
    payloads = [e.payload for e in encoded]  # joined outside the timing: a load reads mapped pack ranges
    for d, (_, w, _, _) in zip(decode_all(payloads, encoded, pairs, map), pairs, strict=True):
        if d.tobytes() != w.tobytes():
            raise SystemExit("decode is not bit-exact")
    results: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for cores in (1, 2):
                # affinity first: the coding threads (re)started below inherit it
                os.sched_setaffinity(0, set(cores_all[:cores]))
                planes.set_coding_threads(cores)
                with ThreadPoolExecutor(cores) as pool:
                    for mode, each in (("one", map), ("store", pool.map)):
                        enc = mb / _time(lambda each=each: list(each(_encode, pairs)), reps)
                        dec = mb / _time(lambda each=each: decode_all(payloads, encoded, pairs, each), reps)
                        results.setdefault(f"{mode}_encode_{cores}", []).append(enc)
                        results.setdefault(f"{mode}_decode_{cores}", []).append(dec)
    finally:
        os.sched_setaffinity(0, set(cores_all))
        planes.set_coding_threads(len(cores_all))
    report: dict[str, Any] = {"tensors": len(pairs), "logical_mb": round(mb, 1), "rounds": rounds, "reps": reps}
    for mode in ("one", "store"):
        for what in ("encode", "decode"):
            one, two = results[f"{mode}_{what}_1"], results[f"{mode}_{what}_2"]
            report[f"{mode}_{what}_mb_s"] = [round(statistics.median(one), 1), round(statistics.median(two), 1)]
            report[f"{mode}_{what}_ratio"] = round(statistics.median(b / a for a, b in zip(one, two, strict=True)), 2)
            report[f"{mode}_{what}_ratios"] = [round(b / a, 2) for a, b in zip(one, two, strict=True)]
    return report


def _encode(t: tuple[str, np.ndarray, np.ndarray, codecs.TensorSpec]) -> codecs.Encoded:
    return codecs.encode(t[1], t[3], {"prev": t[2]})


def decode_all(payloads: list[bytes], encoded: list[codecs.Encoded], pairs: list[Any], each: Any) -> list[np.ndarray]:
    return list(
        each(
            lambda t: codecs.decode(t[0], t[1].codecs, t[2][3], {"prev": t[2][2]}),
            zip(payloads, encoded, pairs, strict=True),
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, required=True, help="folder of open_clip_train epoch_N.pt files")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per setting in each round (median)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds alternating 1 and 2 cores (median of ratios)")
    ap.add_argument("--min-mb", type=float, default=4.0, help="smallest tensor measured, MB")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    report = run(args.checkpoints, args.reps, int(args.min_mb * 1e6), args.rounds)
    for mode, label in (("one", "one tensor at a time"), ("store", "tensors at once, as Store.save/load")):
        for what in ("encode", "decode"):
            one, two = report[f"{mode}_{what}_mb_s"]
            print(
                f"{label:36s} {what}: 1 core {one:7.1f} MB/s, 2 cores {two:7.1f} MB/s, "
                f"ratio {report[f'{mode}_{what}_ratio']}x (rounds: {report[f'{mode}_{what}_ratios']})"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
