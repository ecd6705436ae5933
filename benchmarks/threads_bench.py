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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ckptstore import codecs
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


def _child(directory: Path, cores: int, reps: int, min_bytes: int) -> dict[str, Any]:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    pairs = _pairs(directory, min_bytes)
    logical = sum(w.nbytes for _, w, _, _ in pairs)
    enc_s, dec_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        encoded = [codecs.encode(w, spec, {"prev": p}) for _, w, p, spec in pairs]
        enc_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decoded = [
            codecs.decode(b"".join(bytes(x) for x in e.parts), e.codecs, spec, {"prev": p})
            for e, (_, _, p, spec) in zip(encoded, pairs, strict=True)
        ]
        dec_s.append(time.perf_counter() - t0)
        if any(d.tobytes() != w.tobytes() for d, (_, w, _, _) in zip(decoded, pairs, strict=True)):
            raise SystemExit("decode is not bit-exact")
    mb = logical / 1e6
    return {
        "cores": cores,
        "tensors": len(pairs),
        "logical_mb": round(mb, 1),
        "encode_mb_s": round(mb / statistics.median(enc_s), 1),
        "decode_mb_s": round(mb / statistics.median(dec_s), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, required=True, help="folder of open_clip_train epoch_N.pt files")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per core count (median)")
    ap.add_argument("--min-mb", type=float, default=4.0, help="smallest tensor measured, MB")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    min_bytes = int(args.min_mb * 1e6)
    if args.child:
        print(json.dumps(_child(args.checkpoints, args.child, args.reps, min_bytes)))
        return 0
    available = len(os.sched_getaffinity(0))
    rows = []
    for cores in (1, 2):
        if cores > available:
            print(f"only {available} core(s) available: no {cores}-core run", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--checkpoints", str(args.checkpoints), "--reps", str(args.reps)]
        cmd += ["--min-mb", str(args.min_mb), "--child", str(cores)]
        child = subprocess.run(cmd, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"the {cores}-core run failed:\n{child.stderr[-2000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    report: dict[str, Any] = {"rows": rows}
    if len(rows) == 2:
        report["encode_ratio"] = round(rows[1]["encode_mb_s"] / rows[0]["encode_mb_s"], 2)
        report["decode_ratio"] = round(rows[1]["decode_mb_s"] / rows[0]["decode_mb_s"], 2)
        print(f"2 cores / 1 core: encode {report['encode_ratio']}x, decode {report['decode_ratio']}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
