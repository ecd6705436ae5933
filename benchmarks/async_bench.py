"""Benchmark: what an async save costs the training loop, on a real OpenCLIP trajectory (issue 11, items 1 and 5).

Per checkpoint of the trajectory, in one warm process and in the same order each time: a copy of every tensor
into preallocated buffers (the floor of any consistent snapshot on CPU; numpy and torch copies, the faster
counts), ``clone()`` into fresh memory, ``torch.save`` to a new file (without and with fsync), and
``Store.save_async``: its stall (call to return) and its total (call to commit). Right after each async call the
state is changed in place, and at the end every stored checkpoint is compared byte for byte with its file.
Then: the peak extra memory (RSS high-water mark) of sync saves, async saves and torch.save, each in a fresh
process; torch DCP ``async_save`` (stall and total) with its ``ZStandard`` stream extension where this torch has
it (one-process gloo group); and the end-to-end wall time of an open_clip-like CPU training loop (the real
open_clip model of the trajectory, synthetic batches) saving every epoch through ckptstore async vs torch.save.

    python benchmarks/async_bench.py                                  # the cached 20-epoch trajectory
    python benchmarks/async_bench.py --checkpoints DIR --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

from ckptstore import create_store
from ckptstore.format.tree import flatten
from ckptstore.integrations.openclip import epoch_files, read_checkpoint


def tensors_of(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in tensors_of(v)]
    return []


def mutate(state: Any) -> None:
    """A training step's worth of in-place change: every tensor's bytes change."""
    with torch.no_grad():
        for t in tensors_of(state):
            if t.is_floating_point():
                t.add_(1.0)
            else:
                t.bitwise_not_()


def torch_save(state: Any, path: Path, fsync: bool) -> None:
    with open(path, "wb") as fh:
        torch.save(state, fh)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def leaves_bytes(state: Any) -> dict[str, bytes]:
    _, leaves = flatten(state)
    return {n: lf.data.tobytes() for n, lf in leaves.items()}


# ------------------------------------------------------------------------------------------------ stalls
def stalls(files: list[Path], work: Path, threads: int) -> dict[str, Any]:
    store = create_store(work / "async.store", threads=threads)
    rows: list[dict[str, float]] = []
    np_bufs: list[np.ndarray] | None = None
    t_bufs: list[torch.Tensor] | None = None
    steps = []
    for i, f in enumerate(files):
        ckpt = read_checkpoint(f)
        ts = tensors_of(ckpt)
        _, leaves = flatten(ckpt)
        views = [lf.data for lf in leaves.values()]
        if np_bufs is None or t_bufs is None:
            np_bufs = [np.empty_like(v) for v in views]
            t_bufs = [torch.empty_like(t) for t in ts]
            for b, v in zip(np_bufs, views, strict=True):  # first touch outside the timing, as a reused buffer is
                np.copyto(b, v)
            for tb, t in zip(t_bufs, ts, strict=True):
                tb.copy_(t)
        row: dict[str, float] = {}
        gc.collect()
        t0 = time.perf_counter()
        for b, v in zip(np_bufs, views, strict=True):
            np.copyto(b, v)
        row["copy_numpy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for tb, t in zip(t_bufs, ts, strict=True):
            tb.copy_(t)
        row["copy_torch"] = time.perf_counter() - t0
        row["copy_floor"] = min(row["copy_numpy"], row["copy_torch"])
        t0 = time.perf_counter()
        clones = [t.clone() for t in ts]
        row["clone"] = time.perf_counter() - t0
        del clones
        gc.collect()
        for fsync in (False, True):
            target = work / f"epoch_{i}.{int(fsync)}.pt"
            t0 = time.perf_counter()
            torch_save(ckpt, target, fsync)
            row["torch_save_fsync" if fsync else "torch_save"] = time.perf_counter() - t0
            target.unlink()
        gc.collect()
        step = int(ckpt.get("epoch", i))
        t0 = time.perf_counter()
        h = store.save_async("bench", step, ckpt, {"epoch": step})
        row["async_stall"] = time.perf_counter() - t0
        mutate(ckpt)  # the caller's tensors change right after the call
        h.result()
        row["async_total"] = time.perf_counter() - t0
        rows.append(row)
        steps.append((step, f))
        del ckpt, ts, leaves, views
    store.close()
    fresh = create_store(work / "async.store", exist_ok=True)
    exact = all(
        leaves_bytes(read_checkpoint(f)) == leaves_bytes(fresh.load(f"bench@{s}", tensors="torch")) for s, f in steps
    )
    verify = fresh.verify()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratios = [r["async_stall"] / r["torch_save"] for r in rows]
    floors = [r["async_stall"] / r["copy_floor"] for r in rows]
    return {
        "rows": rows,
        "median": med,
        "stall_over_torch_save": statistics.median(ratios),
        "stall_over_copy_floor": statistics.median(floors),
        "stall_over_torch_save_range": [min(ratios), max(ratios)],
        "stall_over_copy_floor_range": [min(floors), max(floors)],
        "bit_exact_after_mutation": exact,
        "verify_ok": verify["ok"],
        "pool": dict(fresh._saver.pool.stats),
    }


# ------------------------------------------------------------------------------------------------ memory
MEMORY_CHILD = """
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[4])
from async_bench import mutate, torch_save
from trajectory_bench import PeakRSS  # the same high-water-mark probe
from ckptstore import create_store
from ckptstore.integrations.openclip import read_checkpoint

mode, ckpt_file, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(2)
state = read_checkpoint(ckpt_file)
store = create_store(work / f"memory-{mode}.store", threads=2)
saves = 5
with PeakRSS() as mem:
    for i in range(saves):
        if mode == "sync":
            store.save("m", i, state)
        elif mode == "async":
            h = store.save_async("m", i, state)
            mutate(state)  # while the background save runs, as training does
            h.result()
        else:
            torch_save(state, work / f"m{i}.pt", False)
        if mode != "async":
            mutate(state)
print(json.dumps({"mode": mode, "extra": mem.extra}))
"""


def memory(ckpt_file: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("torch", "sync", "async"):
        for attempt in range(2):  # a child can die of a full machine (memory): say so, try once more
            res = subprocess.run(
                [sys.executable, "-c", MEMORY_CHILD, mode, str(ckpt_file), str(work), str(Path(__file__).parent)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            if res.returncode == 0:
                break
            print(f"memory child {mode} failed (attempt {attempt + 1}): {res.stderr[-1500:]}", file=sys.stderr)
            shutil.rmtree(work / f"memory-{mode}.store", ignore_errors=True)
        res.check_returncode()
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])["extra"]
        shutil.rmtree(work / f"memory-{mode}.store", ignore_errors=True)
        for p in work.glob("m*.pt"):
            p.unlink()
    ckpt = read_checkpoint(ckpt_file)
    sizes = sorted((t.nbytes for t in tensors_of(ckpt)), reverse=True)
    out["checkpoint_bytes"] = sum(sizes)
    out["largest_tensors"] = sizes[:3]
    return out


# ------------------------------------------------------------------------------------------------ DCP
def dcp(files: list[Path], work: Path) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp_mod
    from torch.distributed.checkpoint import FileSystemWriter

    try:
        from torch.distributed.checkpoint._extension import ZStandard

        zstd_ok = ZStandard.is_available()
    except ImportError:
        ZStandard, zstd_ok = None, False  # type: ignore[assignment,misc]
    out: dict[str, Any] = {"zstandard_extension": zstd_ok, "torch": torch.__version__}
    dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1)
    try:
        for label, ext in (("plain", None), ("zstd", ZStandard() if zstd_ok else None)):
            if label == "zstd" and ext is None:
                continue
            rows = []
            for i, f in enumerate(files):
                ckpt = read_checkpoint(f)
                # DCP keys are strings: the optimizer's int-keyed state as DCP's own get_state_dict would give
                state = {"state_dict": ckpt["state_dict"], "optimizer": _str_keys(ckpt["optimizer"])}
                writer = FileSystemWriter(str(work / f"dcp-{label}-{i}"), _extensions=[ext] if ext else None)
                t0 = time.perf_counter()
                fut = dcp_mod.async_save(state, storage_writer=writer)
                stall = time.perf_counter() - t0
                mutate(state)
                (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
                rows.append({"stall": stall, "total": time.perf_counter() - t0})
                size = sum(p.stat().st_size for p in (work / f"dcp-{label}-{i}").rglob("*") if p.is_file())
                rows[-1]["bytes"] = size
                shutil.rmtree(work / f"dcp-{label}-{i}")
            out[label] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    finally:
        dist.destroy_process_group()
    return out


def _str_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_str_keys(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------ end to end
def end_to_end(work: Path, *, epochs: int, steps: int, reps: int, size: str) -> dict[str, Any]:
    """Wall time of an open_clip-like CPU training loop saving every epoch: torch.save (sync, a new file per
    epoch) vs ckptstore save_async (waited for at the end). The modes alternate, ``reps`` times each."""
    import open_clip

    from ckptstore.demo.trajectory import build_model

    def loop(mode: str, rep: int) -> float:
        torch.manual_seed(0)
        model = build_model(size)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
        loss_fn = open_clip.ClipLoss()
        g = torch.Generator().manual_seed(1)
        ctx = model.context_length if hasattr(model, "context_length") else 32
        images = torch.randn(steps, 64, 3, 32, 32, generator=g)
        texts = torch.randint(0, 49408, (steps, 64, ctx), generator=g)
        out_dir = work / f"e2e-{mode}-{rep}"
        out_dir.mkdir()
        store = None
        if mode == "ckptstore_async":
            store = create_store(out_dir / "store")
        elif mode == "ckptstore_async_hot":  # newest raw, compaction in the background (waited for by close)
            store = create_store(out_dir / "store", layout="hot")
        elif mode == "ckptstore_async_hot_deferred":  # newest raw, compaction after training (timed apart)
            store = create_store(out_dir / "store", layout="hot", compaction="manual")
        t0 = time.perf_counter()
        for epoch in range(1, epochs + 1):
            for s in range(steps):
                img_f, txt_f, scale = model(images[s], texts[s])[:3]
                loss = loss_fn(img_f, txt_f, scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
            ckpt = {"epoch": epoch, "name": "e2e", "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
            if store is not None:
                store.save_async("e2e", epoch, ckpt)
            else:
                torch_save(ckpt, out_dir / f"epoch_{epoch}.pt", False)
        if store is not None:
            store.wait()  # the last save is committed inside the measured time
            if store.compaction == "background":
                store.wait_compaction()
        wall = time.perf_counter() - t0
        if store is not None:
            if mode == "ckptstore_async_hot_deferred":
                t1 = time.perf_counter()
                store.compact("e2e")
                deferred.append(time.perf_counter() - t1)
            store.close()
        shutil.rmtree(out_dir)
        return wall

    modes = ("torch_save", "ckptstore_async", "ckptstore_async_hot", "ckptstore_async_hot_deferred")
    runs: dict[str, list[float]] = {m: [] for m in modes}
    deferred: list[float] = []
    loop("torch_save", -1)  # warm-up: first-call costs outside the measurement
    for rep in range(reps):
        for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:  # the order rotates each rep
            runs[mode].append(loop(mode, rep))
    med = {k: statistics.median(v) for k, v in runs.items()}
    noise = max((max(v) - min(v)) / statistics.median(v) for v in runs.values())
    return {"runs": runs, "median": med, "async_over_torch": med["ckptstore_async"] / med["torch_save"],
            "ratios": {m: med[m] / med["torch_save"] for m in modes[1:]},
            "deferred_compaction_s": statistics.median(deferred) if deferred else None,
            "spread": noise, "epochs": epochs, "steps_per_epoch": steps}  # fmt: skip


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, help="folder of epoch_N.pt (default: the cached 20-epoch run)")
    ap.add_argument("--threads", type=int, default=2, help="the store's encode threads")
    ap.add_argument("--e2e-epochs", type=int, default=6)
    ap.add_argument("--e2e-steps", type=int, default=10, help="training steps per epoch in the end-to-end loop")
    ap.add_argument("--e2e-reps", type=int, default=3)
    ap.add_argument("--dcp-checkpoints", type=int, default=6, help="checkpoints for the DCP comparison")
    ap.add_argument("--skip", nargs="*", default=[], choices=["stalls", "memory", "dcp", "e2e"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.checkpoints is None:
        from ckptstore.demo.trajectory import ensure_trajectory

        a.checkpoints = ensure_trajectory(epochs=20, size="tiny")
    files = epoch_files(a.checkpoints)
    work = Path(tempfile.mkdtemp(prefix="ckpt-async-bench-", dir=a.workdir))
    report: dict[str, Any] = {"checkpoints": str(a.checkpoints), "files": len(files), "cores": os.cpu_count()}
    try:
        if "stalls" not in a.skip:
            s = report["stalls"] = stalls(files, work, a.threads)
            m = s["median"]
            print(f"per save, medians over {len(files)} checkpoints of {a.checkpoints}:")
            for k in ("copy_numpy", "copy_torch", "clone", "torch_save", "torch_save_fsync", "async_stall",
                      "async_total"):  # fmt: skip
                print(f"  {k:18s} {m[k] * 1e3:9.1f} ms")
            for key, target in (("torch_save", "0.30"), ("copy_floor", "1.5")):
                lo, hi = s[f"stall_over_{key}_range"]
                print(
                    f"  async stall / {key:10s} {s[f'stall_over_{key}']:.3f} "
                    f"(range {lo:.3f}-{hi:.3f}; target <= {target})"
                )
            print(f"  bit-exact after in-place mutation: {s['bit_exact_after_mutation']}; verify ok: {s['verify_ok']}")
        if "memory" not in a.skip:
            mem = report["memory"] = memory(files[0], work)
            ck = mem["checkpoint_bytes"]
            print(f"peak extra RSS over 5 saves (checkpoint {ck / 1e6:.1f} MB, largest tensors "
                  f"{[round(x / 1e6, 1) for x in mem['largest_tensors']]} MB):")  # fmt: skip
            for mode in ("torch", "sync", "async"):
                print(f"  {mode:6s} {mem[mode] / 1e6:8.1f} MB = {mem[mode] / ck:.2f} checkpoints")
            diff = mem["async"] - mem["sync"]
            print(f"  async - sync {diff / 1e6:8.1f} MB = {diff / ck:.2f} checkpoints")
        if "dcp" not in a.skip:
            d = report["dcp"] = dcp(files[: a.dcp_checkpoints], work)
            print(f"torch DCP async_save (torch {d['torch']}, ZStandard extension: {d['zstandard_extension']}):")
            for label in ("plain", "zstd"):
                if label in d:
                    r = d[label]
                    print(f"  {label:6s} stall {r['stall'] * 1e3:8.1f} ms  total {r['total'] * 1e3:8.1f} ms  "
                          f"{r['bytes'] / 1e6:7.1f} MB")  # fmt: skip
        if "e2e" not in a.skip:
            e = report["e2e"] = end_to_end(work, epochs=a.e2e_epochs, steps=a.e2e_steps, reps=a.e2e_reps,
                                           size="tiny")  # fmt: skip
            print(f"end to end ({e['epochs']} epochs x {e['steps_per_epoch']} steps, save every epoch):")
            for k, v in e["runs"].items():
                print(f"  {k:28s} median {e['median'][k]:7.2f} s  runs {[round(x, 2) for x in v]}")
            for k, r in e["ratios"].items():
                print(f"  {k} / torch_save {r:.3f}")
            print(
                f"  deferred compaction after training: {e['deferred_compaction_s']:.2f} s; "
                f"spread within one mode {e['spread']:.1%}"
            )
        if a.json:
            a.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
