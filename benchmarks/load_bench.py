"""Benchmark: the hot layout (issue 11 items 2-3) against the dense layout, on a real open_clip_train trajectory.

In one process, on the same disk:

- stores the trajectory twice, ``layout="dense"`` (every save delta-codes, today's default) and ``layout="hot"``
  (a save writes changed tensors raw; compaction re-encodes every checkpoint but the newest, timed separately
  after each save, as the background thread does it);
- sizes: each store's bytes, weights and weights + AdamW, against XOR + byte planes + zstd-3 (the baseline of
  benchmarks/trajectory_bench.py), for the hot store as training leaves it (newest hot) and after
  ``compact(newest=True)`` (a finished run);
- compaction throughput (logical bytes re-encoded per second of compaction);
- load times against torch.load of the same ``epoch_N.pt``, a fresh Store each time, alternating, medians: the
  newest checkpoint, every single older checkpoint, every checkpoint in order (2 threads), kept in a list and
  streamed (each one let go of before the next);
- with ``--processes N``: the same single loads and both in-order passes of the hot store, each in a
  new process (N alternating pairs each), timed inside the child around the load alone. A user who resumes or
  exports reads in a fresh process; within one long process torch.load's own time for the same file moves
  1.5-2x with what the allocator kept from earlier work (memory it can reuse without page faults), so the
  in-process ratios above depend on the benchmark's history as much as on either reader;
- a bit-exact check of every tensor of every checkpoint of both stores, before and after compaction.

    python benchmarks/load_bench.py --checkpoints DIR [--limit N] [--reps 5] [--processes 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckptstore import create_store, open_store
from ckptstore.format.tree import flatten
from ckptstore.integrations.openclip import epoch_files, read_checkpoint
from ckptstore.store import Store
from trajectory_bench import _torch_save_sync, is_weight, timed, zstd_planes


def store_bytes(store: Store, run: str) -> dict[str, int]:
    """Stored payload bytes of a run, split into weights and everything: each (pack, offset) counted once, for
    the first checkpoint in step order that names it."""
    seen: set[tuple[str, int]] = set()
    w = a = 0
    for s in store.steps(run):
        m = store.manifest(run, s)
        names = {t["object"]: n for n, t in m.tensors.items()}
        for o, rec in m.objects.items():
            loc = (rec["pack"], int(rec["offset"]))
            if loc in seen:
                continue
            seen.add(loc)
            a += int(rec["length"])
            if is_weight(names.get(o, "")):
                w += int(rec["length"])
    return {"w": w, "all": a}


def xor_baseline(files: list[Path]) -> dict[str, int]:
    prev: dict[str, np.ndarray] = {}
    out = {"w": 0, "all": 0}
    for f in files:
        _, leaves = flatten(read_checkpoint(f))
        for n, lf in leaves.items():
            words = lf.words
            p = prev.get(n)
            size = zstd_planes(np.bitwise_xor(words, p) if p is not None and p.shape == words.shape else words)
            out["all"] += size
            if is_weight(n):
                out["w"] += size
        prev = {n: np.array(lf.words, copy=True) for n, lf in leaves.items()}
    return out


def check_exact(store_dir: Path, files: list[Path], steps: list[int]) -> bool:
    store = open_store(store_dir, threads=2)
    for f, s in zip(files, steps, strict=True):
        _, want = flatten(read_checkpoint(f))
        got = store.load_leaves(f"bench@{s}")
        if set(got) != set(want) or any(got[n].data.tobytes() != lf.data.tobytes() for n, lf in want.items()):
            return False
    return store.verify()["ok"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, required=True, help="folder of epoch_N.pt")
    ap.add_argument("--limit", type=int, help="only the first N checkpoints")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write all figures here")
    ap.add_argument("--workdir", type=Path, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--skip-baseline", action="store_true", help="no XOR baseline (sizes of our stores only)")
    ap.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="also time single loads and the in-order pass of the hot store in fresh processes, N pairs each",
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # one timed load in this process, printed
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.child:
        return _child(a.child)
    files = epoch_files(a.checkpoints)[: a.limit]
    work = Path(tempfile.mkdtemp(prefix="loadbench-", dir=a.workdir))
    rep: dict[str, Any] = {"checkpoints": str(a.checkpoints), "files": len(files), "reps": a.reps}
    try:
        dense = create_store(work / "dense", layout="dense", threads=2)
        hot = create_store(work / "hot", layout="hot", threads=2, compaction="manual")
        steps: list[int] = []
        save: dict[str, list[float]] = {"dense": [], "hot": [], "compact": [], "torch_save": []}
        (work / "pt").mkdir()
        compact_bytes = 0
        for f in files:
            ckpt = read_checkpoint(f)
            step = int(ckpt.get("epoch", len(steps)))
            steps.append(step)
            t0 = time.perf_counter()
            _torch_save_sync(ckpt, work / "pt" / f.name)  # a new file, fsync'd, as a training loop writes
            save["torch_save"].append(time.perf_counter() - t0)
            (work / "pt" / f.name).unlink()
            t0 = time.perf_counter()
            dense.save("bench", step, ckpt)
            save["dense"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hot.save("bench", step, ckpt)
            save["hot"].append(time.perf_counter() - t0)
            res = hot.compact("bench")  # what the background thread does after this save
            if res["compacted"]:
                save["compact"].append(res["seconds"])
                compact_bytes += res["logical_bytes"]
            del ckpt
            print(f"  stored {f.name}", file=sys.stderr)
        rep["save_seconds"] = save
        rep["compaction"] = {
            "logical_bytes": compact_bytes,
            "seconds": sum(save["compact"]),
            "bytes_per_second": compact_bytes / sum(save["compact"]) if save["compact"] else None,
        }
        sizes = {"dense": store_bytes(dense, "bench"), "hot_newest_hot": store_bytes(hot, "bench")}
        hot.close()
        dense.close()
        pt_dir = Path(files[0]).parent
        newest = steps[-1]
        times: dict[str, Any] = {}

        def pair(name: str, ours: Any, theirs: Any, reps: int) -> None:
            o, t = [], []
            for _ in range(reps):  # alternating, so both sides see the same machine state
                o.append(timed(ours, 1)[0])
                t.append(timed(theirs, 1)[0])
            times[name] = {"ours": statistics.median(o), "torch": statistics.median(t)}
            times[name]["ratio"] = times[name]["ours"] / times[name]["torch"]

        for label, d in (("dense", work / "dense"), ("hot", work / "hot")):
            fresh = lambda d=d: open_store(d, threads=2)  # noqa: E731 - a cold Store each time
            pair(
                f"{label}_newest",
                lambda f=fresh: f().load(f"bench@{newest}"),
                lambda: torch.load(pt_dir / files[-1].name, weights_only=True),
                a.reps,
            )
            pair(
                f"{label}_in_order",
                lambda f=fresh: [x for _, x in f().iter_load("bench")],
                lambda: [torch.load(p, weights_only=True) for p in files],
                max(1, a.reps // 2),
            )
            # the same, each checkpoint let go of before the next (how a reader of a run uses it): both sides
            # then hold one checkpoint instead of all of them (2 GB of fresh memory a pass on this trajectory)
            pair(
                f"{label}_in_order_streamed",
                lambda f=fresh: _consume(x for _, x in f().iter_load("bench")),
                lambda: _consume(torch.load(p, weights_only=True) for p in files),
                max(1, a.reps // 2),
            )
            singles = {}
            for s, f in zip(steps, files, strict=True):
                ours = lambda s=s, fr=fresh: fr().load(f"bench@{s}")  # noqa: E731
                pair("_one", ours, lambda f=f: torch.load(f, weights_only=True), max(1, a.reps // 2))
                singles[s] = times.pop("_one")
            times[f"{label}_single"] = singles
            times[f"{label}_single_worst"] = max(v["ratio"] for s, v in singles.items() if s != newest)
            times[f"{label}_single_median"] = statistics.median(v["ratio"] for s, v in singles.items() if s != newest)
            print(f"  timed {label}", file=sys.stderr)
        if a.processes:
            times.update(_in_processes(work / "hot", files, steps, a.processes))
        rep["load"] = times
        rep["bit_exact_hot_newest_hot"] = check_exact(work / "hot", files, steps)
        full = open_store(work / "hot", threads=2)
        res = full.compact("bench", newest=True)
        sizes["hot_all_compacted"] = store_bytes(full, "bench")
        rep["bit_exact_hot_all_compacted"] = check_exact(work / "hot", files, steps)
        rep["bit_exact_dense"] = check_exact(work / "dense", files, steps)
        if not a.skip_baseline:
            sizes["xor"] = xor_baseline(files)
            for k in ("dense", "hot_newest_hot", "hot_all_compacted"):
                sizes[k]["vs_xor_w"] = 1 - sizes[k]["w"] / sizes["xor"]["w"]
                sizes[k]["vs_xor_all"] = 1 - sizes[k]["all"] / sizes["xor"]["all"]
        rep["sizes"] = sizes
        _print(rep)
        if a.json:
            a.json.write_text(json.dumps(rep, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _child(args: list[str]) -> int:
    """``ours STORE REF`` | ``ours-order STORE RUN`` | ``ours-kept STORE RUN`` | ``torch FILE`` |
    ``torch-order FILE...`` | ``torch-kept FILE...``: print the seconds of that one load (imports and start-up not
    counted); ``-order`` lets go of each checkpoint before the next, ``-kept`` keeps them all in a list."""
    what, rest = args[0], args[1:]
    state: Any = None
    t0 = time.perf_counter()
    if what == "ours":
        state = open_store(rest[0], threads=2).load(rest[1])
    elif what == "ours-order":
        _consume(x for _, x in open_store(rest[0], threads=2).iter_load(rest[1]))
    elif what == "ours-kept":
        state = [x for _, x in open_store(rest[0], threads=2).iter_load(rest[1])]
    elif what == "torch":
        state = torch.load(rest[0], weights_only=True)
    elif what == "torch-kept":
        state = [torch.load(p, weights_only=True) for p in rest]
    else:
        _consume(torch.load(p, weights_only=True) for p in rest)
    print(f"{time.perf_counter() - t0:.6f}")
    del state
    return 0


def _in_processes(store: Path, files: list[Path], steps: list[int], pairs: int) -> dict[str, Any]:
    """Single loads and the in-order pass (streamed, and keeping every checkpoint), each in a new process,
    ``pairs`` alternating pairs each."""

    def one(*args: str) -> float:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--checkpoints", ".", "--child", *args]
        return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])

    def pair(ours: list[str], theirs: list[str]) -> dict[str, float]:
        o, t = [], []
        for i in range(pairs):  # alternating, the order swapped every pair
            for side in ("ours", "torch") if i % 2 == 0 else ("torch", "ours"):
                (o if side == "ours" else t).append(one(*(ours if side == "ours" else theirs)))
        return {
            "ours": statistics.median(o),
            "torch": statistics.median(t),
            "ratio": statistics.median(o) / statistics.median(t),
        }

    out: dict[str, Any] = {}
    out["process_in_order_streamed"] = pair(["ours-order", str(store), "bench"], ["torch-order", *map(str, files)])
    out["process_in_order"] = pair(["ours-kept", str(store), "bench"], ["torch-kept", *map(str, files)])
    singles = {}
    for s, f in zip(steps, files, strict=True):
        singles[s] = pair(["ours", str(store), f"bench@{s}"], ["torch", str(f)])
        print(f"  timed bench@{s} in fresh processes: {singles[s]['ratio']:.2f}x", file=sys.stderr)
    out["process_single"] = singles
    older = [v["ratio"] for s, v in singles.items() if s != steps[-1]]
    out["process_single_worst"], out["process_single_median"] = max(older), statistics.median(older)
    return out


def _consume(states: Any) -> None:
    """Go through an iterable of checkpoints holding one at a time."""
    for state in states:
        del state


def _print(rep: dict[str, Any]) -> None:
    med = statistics.median
    s = rep["save_seconds"]
    print(f"{rep['files']} checkpoints of {rep['checkpoints']}")
    compact = med(s["compact"]) if s["compact"] else 0.0
    print(
        f"save, median s: torch.save {med(s['torch_save']):.3f}, dense {med(s['dense']):.3f}, "
        f"hot {med(s['hot']):.3f}; compaction per checkpoint {compact:.3f} s"
    )
    c = rep["compaction"]
    if c["bytes_per_second"]:
        print(f"compaction throughput: {c['bytes_per_second'] / 1e6:.0f} MB/s of logical bytes")
    for k, v in rep["sizes"].items():
        extra = (
            f"  below XOR: weights {v['vs_xor_w'] * 100:.1f} %, all {v['vs_xor_all'] * 100:.1f} %"
            if "vs_xor_w" in v
            else ""
        )
        print(f"bytes {k:<18} weights {v['w'] / 1e6:9.2f} MB  all {v['all'] / 1e6:9.2f} MB{extra}")  # fmt: skip
    for k, v in rep["load"].items():
        if isinstance(v, dict) and "ratio" in v:
            print(f"load {k:<16} {v['ours']:.3f} s vs torch.load {v['torch']:.3f} s = {v['ratio']:.2f}x")
        elif k.endswith("_worst"):
            print(f"load {k:<16} {v:.2f}x (single older checkpoint, worst)")
        elif k.endswith("_single_median"):
            print(f"load {k:<16} {v:.2f}x (single older checkpoint, median)")
    print(
        f"bit-exact: dense {rep['bit_exact_dense']}, hot {rep['bit_exact_hot_newest_hot']}, "
        f"hot fully compacted {rep['bit_exact_hot_all_compacted']}"
    )


if __name__ == "__main__":
    sys.exit(main())
