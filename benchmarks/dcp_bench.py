"""DCP saves from several ranks: ckptstore's ``StoreWriter`` against torch's ``FileSystemWriter`` (plain, and with
its ``ZStandard`` extension), on an open_clip model's full training state (weights + AdamW state).

    PYTHONPATH=src python benchmarks/dcp_bench.py [--model ViT-B-16] [--worlds 2 4] [--saves 4] [--json OUT]

1. One process builds ``open_clip.create_model(MODEL)`` (random init), runs ``--warmup`` real AdamW steps on tiny
   random batches (``--batch`` images + captions, CLIP loss), then ``--saves`` more steps, writing the state after
   each (``{"state_dict", "optimizer"}``) to a temp file: ``--saves`` consecutive checkpoints of a training loop.
2. For each world size and writer, that many ranks are forked (gloo, CPU); each rank takes its shard of every tensor
   (``Shard(0)`` DTensors; tensors with fewer rows than ranks and AdamW's step counters replicated), copied into its
   own memory, and saves the ``--saves`` checkpoints one after the other with ``dcp.save`` (then, for ``async``
   rows, with ``dcp.async_save``: the time until it returns is its blocking part).
3. Reported per (world, writer): median total save time (barrier to barrier, the slowest rank), median blocking
   part of ``async_save``, bytes on disk after all saves, each rank's peak RSS during a save (``VmHWM``, reset
   through ``/proc/self/clear_refs`` before each save), its RSS just before a save (its shard, plus what the writer
   keeps between saves: ``StoreWriter`` keeps the previous checkpoint's shards as delta bases), the difference of
   the two, and its shard size.

Timings on a shared machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ckptstore.testing.ranks import fork_ranks
from ckptstore.testing.s3 import free_port

WRITERS = ("ckptstore", "fs", "fs_zstd")


# ------------------------------------------------------------------------------------------ the training states
def train_states(model_name: str, warmup: int, saves: int, batch: int, lr: float, out: Path) -> dict[str, Any]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    loss_fn = open_clip.loss.ClipLoss()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    ctx, vocab = model.context_length, model.vocab_size
    g = torch.Generator().manual_seed(1)
    files, step_s = [], []
    for step in range(warmup + saves):
        t0 = time.perf_counter()
        images = torch.randn(batch, 3, size, size, generator=g)
        texts = torch.randint(0, vocab, (batch, ctx), generator=g)
        res = model(images, texts)
        if isinstance(res, dict):
            img_f, txt_f, scale = res["image_features"], res["text_features"], res["logit_scale"]
        else:
            img_f, txt_f, scale = res[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        if step >= warmup:
            f = out / f"state_{step - warmup + 1}.pt"
            torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, f)
            files.append(str(f))
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = os.path.getsize(files[0])
    return {"files": files, "params": n_params, "state_file_bytes": state_bytes, "train_step_s": step_s}


# ------------------------------------------------------------------------------------------------- one rank
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def shard_state(full: dict[str, Any], mesh: Any, rank: int, world: int) -> tuple[dict[str, Any], int]:
    """This rank's part of the full state: row shards as DTensors (copied out of the mmap'd file); small tensors
    replicated. Returns the state and the bytes this rank holds."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    held = 0

    def one(t: Any) -> Any:
        nonlocal held
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() == 0:
            held += t.numel() * t.element_size()
            return t.clone()
        n = t.shape[0]
        rows = math.ceil(n / world)
        if (world - 1) * rows >= n:  # some rank would get no rows: replicate
            local = t.clone()
            held += local.numel() * local.element_size()
            return DTensor.from_local(local, mesh, [Replicate()], run_check=False)
        local = t[rank * rows : min(n, (rank + 1) * rows)].clone()
        held += local.numel() * local.element_size()
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return one(x)

    return walk(full), held


def rank_main(rank: int, world: int, port: int, writer: str, mode: str, files: list[str], root: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=1800),
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for k, f in enumerate(files, start=1):
        full = torch.load(f, mmap=True, weights_only=True)
        state, held = shard_state(full, mesh, rank, world)
        del full
        gc.collect()
        rss0 = _rss_kib("VmRSS")
        hwm_ok = _reset_hwm()
        if writer == "ckptstore":
            from ckptstore.dcp import StoreWriter

            w: Any = StoreWriter(os.path.join(root, "store"), "vit", k)
        else:
            from torch.distributed.checkpoint._extension import ZStandard

            ext = [ZStandard()] if writer == "fs_zstd" else None
            w = dcp.FileSystemWriter(os.path.join(root, f"step_{k}"), _extensions=ext)
        dist.barrier()
        t0 = time.perf_counter()
        blocking = None
        if mode == "async":
            fut = dcp.async_save(state, storage_writer=w)
            blocking = time.perf_counter() - t0
            fut.result()
        else:
            dcp.save(state, storage_writer=w)
        dist.barrier()
        total = time.perf_counter() - t0
        hwm = _rss_kib("VmHWM")  # since the reset (else: the process's lifetime peak, flagged by hwm_reset)
        rows.append({"save": k, "total_s": total, "blocking_s": blocking, "rss_before_kib": rss0,
                     "peak_kib": hwm, "extra_kib": hwm - rss0, "held_bytes": held, "hwm_reset": hwm_ok})  # fmt: skip
        del state, w
        gc.collect()
    with open(out, "w") as fh:
        json.dump(rows, fh)
    dist.barrier()
    dist.destroy_process_group()


def run_stage(world: int, writer: str, mode: str, files: list[str], root: Path) -> list[list[dict[str, Any]]]:
    port = free_port()
    outs = [str(root / f"rank{r}.json") for r in range(world)]
    failed = fork_ranks(world, lambda r: rank_main(r, world, port, writer, mode, files, str(root), outs[r]))
    if failed:
        raise RuntimeError(f"{writer} {mode} on {world} ranks: rank {failed[0]} exited with {failed[1]}")
    return [json.loads(Path(o).read_text()) for o in outs]


def _bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith("rank"))


def summarize(per_rank: list[list[dict[str, Any]]], disk: int) -> dict[str, Any]:
    saves = len(per_rank[0])
    totals = [max(r[i]["total_s"] for r in per_rank) for i in range(saves)]
    blocking = [
        max(r[i]["blocking_s"] for r in per_rank) for i in range(saves) if per_rank[0][i]["blocking_s"] is not None
    ]
    return {
        "total_s": totals,
        "total_s_median": statistics.median(totals),
        "blocking_s_median": statistics.median(blocking) if blocking else None,
        "bytes": disk,
        "extra_peak_mib_per_rank": [round(max(x["extra_kib"] for x in r) / 1024, 1) for r in per_rank],
        "peak_mib_per_rank": [round(max(x["peak_kib"] for x in r) / 1024, 1) for r in per_rank],
        "rss_before_mib_per_rank": [round(max(x["rss_before_kib"] for x in r) / 1024, 1) for r in per_rank],
        "held_mib_per_rank": [round(r[0]["held_bytes"] / 2**20, 1) for r in per_rank],
        "hwm_reset": all(x["hwm_reset"] for r in per_rank for x in r),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    ap.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="AdamW steps before the first save")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4, help="open_clip_train's default peak learning rate")
    ap.add_argument("--tmp", help="folder for the states and the saves (default: a temp folder)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = Path(tempfile.mkdtemp(prefix="dcp-bench-", dir=args.tmp))
    result: dict[str, Any] = {"model": args.model, "saves": args.saves, "warmup": args.warmup, "lr": args.lr,
                              "batch": args.batch, "cpus": os.cpu_count(), "stages": {}}  # fmt: skip
    try:
        t0 = time.perf_counter()
        pid = os.fork()  # train in a child, so the ranks forked below do not inherit the model's memory
        if pid == 0:
            code = 0
            try:
                torch.set_num_threads(max(1, os.cpu_count() or 1))
                info = train_states(args.model, args.warmup, args.saves, args.batch, args.lr, base)
                (base / "train.json").write_text(json.dumps(info))
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        _, raw = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(raw) != 0:
            raise RuntimeError("training the states failed")
        info = json.loads((base / "train.json").read_text())
        result.update({k: v for k, v in info.items() if k != "files"})
        result["train_s"] = time.perf_counter() - t0
        gib = info["state_file_bytes"] / 2**30
        print(f"{args.model}: {info['params'] / 1e6:.1f} M params, state file {gib:.2f} GiB, "
              f"{args.warmup}+{args.saves} AdamW steps in {result['train_s']:.0f} s", flush=True)  # fmt: skip
        for world in args.worlds:
            for mode in args.modes:
                for writer in args.writers:
                    root = base / f"{writer}-{mode}-{world}"
                    root.mkdir()
                    if writer == "ckptstore":
                        from ckptstore.store import create_store

                        create_store(root / "store").close()
                    per_rank = run_stage(world, writer, mode, info["files"], root)
                    row = summarize(per_rank, _bytes_on_disk(root))
                    result["stages"][f"{writer}/{mode}/{world}"] = row
                    print(f"{world} ranks {mode:5s} {writer:9s}: save {row['total_s_median']:.2f} s (median of "
                          f"{args.saves})"
                          + (f", blocking {row['blocking_s_median']:.2f} s" if mode == "async" else "")
                          + f", {row['bytes'] / 2**30:.3f} GiB on disk, extra peak per rank "
                          f"{row['extra_peak_mib_per_rank']} MiB (shard {row['held_mib_per_rank']} MiB), peak RSS "
                          f"{row['peak_mib_per_rank']} MiB, RSS before a save {row['rss_before_mib_per_rank']} MiB",
                          flush=True)  # fmt: skip
                    shutil.rmtree(root)
        for world in args.worlds:
            for mode in args.modes:
                s = result["stages"]
                ours, z = s.get(f"ckptstore/{mode}/{world}"), s.get(f"fs_zstd/{mode}/{world}")
                plain = s.get(f"fs/{mode}/{world}")
                if ours and z:
                    print(f"{world} ranks {mode}: bytes ckptstore/zstd {ours['bytes'] / z['bytes']:.3f} "
                          f"({100 * (1 - ours['bytes'] / z['bytes']):.1f} % smaller); time ckptstore/zstd "
                          f"{ours['total_s_median'] / z['total_s_median']:.2f}x", flush=True)  # fmt: skip
                if ours and plain and mode == "async":
                    ratio = ours["blocking_s_median"] / plain["blocking_s_median"]
                    print(f"{world} ranks async: blocking ckptstore/fs {ratio:.2f}x", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
