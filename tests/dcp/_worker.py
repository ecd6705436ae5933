"""One rank of a DCP job, run as its own process by test_dcp.py (gloo, CPU).

    python _worker.py STORE OPTIONS_JSON STAGE [STAGE ...]      # STAGE: WORLD:ACTION:STEP:LAYOUT

The launcher imports torch once and, for each stage in turn, forks WORLD ranks with a fresh port (much faster than
WORLD new interpreters per stage on a small machine); if a rank fails or dies, it kills the others, prints
``rank R exited with C`` and exits 3.

ACTION: save | async_save | load | kill (save, but this rank SIGKILLs itself after writing its pack) | fsdp_save |
fsdp_load | clip_save (an open_clip_train-style checkpoint, :func:`clip_state`, as run ``clip``) | fs_save /
fs_zsave (plain DCP FileSystemWriter, without / with ZStandard, into STORE/step_N) | fs_load (FileSystemReader of
STORE/export_N). LAYOUT picks
the sharding of each tensor (``a``: rows, ``b``: columns), so a load can use another sharding than the save.
Every rank rebuilds the full tensors from the step number and compares bytes.
Environment: GLOO_INIT_FILE (the rendezvous file, set by the launcher), DIE_RANK (for kill).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ckptstore.dcp import StoreReader, StoreWriter
from ckptstore.testing.ranks import fork_ranks


def full_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    base = {
        "w": torch.randn(64, 40, generator=g),
        "b": torch.randn(7, generator=g),  # 7 rows over 4 ranks: uneven shards
        "h": torch.randn(6, 8, generator=g).to(torch.bfloat16),
        "frozen": torch.randn(5, 4, generator=g),
        "m": torch.randn(48, 24, generator=g),
    }
    out = {}
    for k, v in base.items():
        if k == "frozen":
            out[k] = v
        else:  # a small training step between checkpoints: the delta codec's case
            out[k] = (v.float() + 1e-3 * step * torch.sin(torch.arange(v.numel()).reshape(v.shape).float())).to(v.dtype)
    return out


CLIP_SHAPES = {  # an open_clip-like model, small: names as open_clip_train's state_dict has them
    "visual.conv1.weight": (16, 3, 4, 4),
    "visual.ln_pre.weight": (16,),
    "visual.proj": (16, 8),
    "token_embedding.weight": (50, 16),
    "text_projection": (16, 8),
    "logit_scale": (),
    "ln_final.bias": (3,),  # fewer rows than ranks: replicated
}


def clip_state(step: int) -> dict:
    """An open_clip_train-style checkpoint (``epoch``, ``state_dict``, ``optimizer`` with AdamW state) after
    ``step`` small updates; no matmuls, so every process builds the same bits."""
    g = torch.Generator().manual_seed(99)
    sd, opt = {}, {}
    for i, (k, shape) in enumerate(CLIP_SHAPES.items()):
        base = torch.randn(shape, generator=g)
        drift = torch.sin(torch.arange(base.numel(), dtype=torch.float32).reshape(shape) * 0.37 + i)
        w = base + 1e-3 * step * drift
        sd[k] = w.to(torch.bfloat16) if k == "text_projection" else w
        opt[i] = {
            "step": torch.tensor(float(step)),
            "exp_avg": 1e-2 * step * drift,
            "exp_avg_sq": 1e-5 * step * drift * drift,
        }
    groups = [
        {
            "lr": 1e-3,
            "betas": [0.9, 0.98],
            "eps": 1e-6,
            "weight_decay": 0.2,
            "amsgrad": False,
            "params": list(range(len(CLIP_SHAPES))),
        }
    ]
    return {"epoch": step, "name": "tiny-clip", "state_dict": sd, "optimizer": {"state": opt, "param_groups": groups}}


def empty_clip() -> dict:
    """:func:`clip_state`'s structure, zeroed: what a rank hands ``dcp.load`` to fill."""
    st = clip_state(0)

    def zero(x):
        if isinstance(x, torch.Tensor):
            return torch.zeros_like(x)
        if isinstance(x, dict):
            return {k: zero(v) for k, v in x.items()}
        return x

    out = zero(st)
    out["epoch"], out["name"] = -1, ""
    out["optimizer"]["param_groups"] = [
        {k: (0.0 if isinstance(v, float) else v) for k, v in g.items()} for g in out["optimizer"]["param_groups"]
    ]
    return out


def distribute_clip(mesh, state: dict, layout: str) -> dict:
    world = mesh.size()

    def dist_one(t: torch.Tensor) -> DTensor:
        if t.dim() == 0 or t.shape[0] < world:
            return distribute_tensor(t, mesh, [Replicate()])
        dim = 1 if layout == "b" and t.dim() > 1 and t.shape[1] >= world else 0
        return distribute_tensor(t, mesh, [Shard(dim)])

    out = dict(state)
    out["state_dict"] = {k: dist_one(v) for k, v in state["state_dict"].items()}
    out["optimizer"] = {
        "state": {
            i: {k: dist_one(v) if v.dim() else v for k, v in st.items()}
            for i, st in state["optimizer"]["state"].items()
        },
        "param_groups": state["optimizer"]["param_groups"],
    }
    return out


def placements(layout: str, name: str) -> list[Shard | Replicate]:
    if name == "frozen":
        return [Replicate()]
    if layout == "a" or name == "b":
        return [Shard(0)]
    return [Shard(1)]


def make_state(mesh, step: int, layout: str, empty: bool) -> dict:
    full = full_state(step)
    model = {}
    for k in ("w", "b", "h", "frozen"):
        t = torch.zeros_like(full[k]) if empty else full[k]
        model[k] = distribute_tensor(t, mesh, placements(layout, k))
    m = torch.zeros_like(full["m"]) if empty else full["m"]
    return {
        "model": model,
        "optim": {
            "m": distribute_tensor(m, mesh, placements(layout, "m")),
            "step": 0 if empty else step,
            "lr": 0.0 if empty else 0.5,
        },
        "plain": torch.zeros(3) if empty else torch.arange(3.0) + step,
    }


def check(state: dict, step: int) -> None:
    full = full_state(step)
    for k in ("w", "b", "h", "frozen"):
        got = state["model"][k].full_tensor()
        assert got.dtype == full[k].dtype and torch.equal(
            got.view(-1).view(torch.uint8), full[k].view(-1).view(torch.uint8)
        ), k
    assert torch.equal(state["optim"]["m"].full_tensor(), full["m"])
    assert state["optim"]["step"] == step and state["optim"]["lr"] == 0.5, state["optim"]
    assert torch.equal(state["plain"], torch.arange(3.0) + step)


def main(store: str, options: dict | None, action: str, step: int, layout: str) -> None:
    # A file rendezvous, not a TCP port: with two test workers running rank groups at once, a port picked free
    # here could be taken by the other before the store binds it. Gloo's own connections bind port 0.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.environ['GLOO_INIT_FILE']}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=60),
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    if action in ("save", "async_save", "kill"):
        state = make_state(mesh, step, layout, empty=False)
        writer = StoreWriter(store, "run", step, {"epoch": step}, storage_options=options)
        if action == "kill" and rank == int(os.environ["DIE_RANK"]):
            original = writer.write_data

            def write_then_die(plan, planner):  # the pack is written, the commit never comes
                original(plan, planner)
                os.kill(os.getpid(), signal.SIGKILL)

            writer.write_data = write_then_die  # type: ignore[method-assign]
        if action == "async_save":
            fut = dcp.async_save(state, storage_writer=writer)
            fut.result()
        else:
            dcp.save(state, storage_writer=writer)
    elif action == "clip_save":
        dcp.save(distribute_clip(mesh, clip_state(step), layout), storage_writer=StoreWriter(store, "clip", step))
    elif action in ("fs_save", "fs_zsave"):  # plain DCP: FileSystemWriter into STORE/step_N (STORE: a folder)
        from torch.distributed.checkpoint._extension import ZStandard

        ext = [ZStandard()] if action == "fs_zsave" else None
        writer = dcp.FileSystemWriter(f"{store}/step_{step}", _extensions=ext)
        dcp.save(distribute_clip(mesh, clip_state(step), layout), storage_writer=writer)
    elif action == "fs_load":  # plain DCP: FileSystemReader of STORE/export_N, resharded onto this world
        state = distribute_clip(mesh, empty_clip(), layout)
        dcp.load(state, storage_reader=dcp.FileSystemReader(f"{store}/export_{step}"))
        want = clip_state(step)
        for k, v in state["state_dict"].items():
            assert torch.equal(
                v.full_tensor().view(-1).view(torch.uint8), want["state_dict"][k].view(-1).view(torch.uint8)
            ), k
        for i, st in state["optimizer"]["state"].items():
            for k, v in st.items():
                full = v.full_tensor() if isinstance(v, DTensor) else v
                assert torch.equal(full, want["optimizer"]["state"][i][k]), (i, k)
        assert state["epoch"] == step and state["name"] == "tiny-clip"
        assert state["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    elif action == "load":
        state = make_state(mesh, step, layout, empty=True)
        dcp.load(state, storage_reader=StoreReader(store, f"run@{step}", storage_options=options))
        check(state, step)
    elif action in ("fsdp_save", "fsdp_load"):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if action == "fsdp_save":
            dcp.save({"model": get_model_state_dict(model)}, storage_writer=StoreWriter(store, "fsdp", step))
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            sd = {"model": get_model_state_dict(model)}
            dcp.load(sd, storage_reader=StoreReader(store, f"fsdp@{step}"))
            set_model_state_dict(model, sd["model"])
            for k, v in get_model_state_dict(model).items():
                full = v.full_tensor() if isinstance(v, DTensor) else v
                assert torch.equal(full, reference[k]), k
    dist.barrier()
    if rank == 0:
        print("OK", action, world)
    dist.destroy_process_group()


def launch(store: str, options: dict | None, stage: str) -> int:
    world_s, action, step, layout = stage.split(":")
    world = int(world_s)
    rendezvous = tempfile.mkdtemp(prefix="gloo-rdzv-")
    os.environ["GLOO_INIT_FILE"] = os.path.join(rendezvous, "init")  # one fresh file per stage
    os.environ["WORLD_SIZE"] = str(world)

    def rank(r: int) -> None:
        os.environ["RANK"] = str(r)
        main(store, options, action, int(step), layout)

    try:
        failed = fork_ranks(world, rank)
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    if failed:  # fork_ranks killed its peers: they would wait for it until gloo's timeout
        print(f"rank {failed[0]} exited with {failed[1]}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    opts = json.loads(sys.argv[2]) or None
    for st in sys.argv[3:]:
        rc = launch(sys.argv[1], opts, st)
        if rc:
            sys.exit(rc)
