"""Exact resume: N steps, save, restore in a *new process*, N more steps == 2N steps without stopping, bit for bit.

The training loop is a plain CPU loop with everything that makes resuming hard: dropout (torch's global RNG),
input noise from numpy's global RNG, a loss weight from Python's ``random``, AdamW with two param groups, a
warm-up + cosine schedule (``SequentialLR``), an AMP ``GradScaler`` whose scale grows during the run, and a
shuffling ``DataLoader``. Every run is a subprocess (the uninterrupted one too), so nothing survives in memory
between the halves. Two resume points are tested:

* at an epoch boundary with ``shuffle=True`` on torch's global RNG — the common loop; the RNG states that
  ``ckptstore.torch`` saves are all it needs;
* in the middle of an epoch with the shuffle drawn from a ``torch.Generator`` — the loop also saves that
  generator's state at the start of the epoch and how many batches it consumed (docs/metadata.md, "Exact resume").

A control resume with ``rng=False`` must diverge, which shows the comparison can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ckptstore  # noqa: E402
from ckptstore import torch as ct  # noqa: E402

LOOP = textwrap.dedent(
    """
    import json, random, sys
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    import ckptstore
    from ckptstore import torch as ct

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    BATCH, STEPS_PER_EPOCH = 16, 6


    def job(mode, store_path, start, stop, out, restore_rng):
        g = torch.Generator().manual_seed(7)  # the data set itself is fixed
        x_all = torch.randn(BATCH * STEPS_PER_EPOCH, 12, generator=g)
        y_all = (x_all[:, :4].sum(1) > 0).long() + (x_all[:, 4:8].sum(1) > 1).long()
        dataset = TensorDataset(x_all, y_all)

        # A resumed run starts from other seeds: whatever restore misses shows up as a difference.
        seed = 1234 if start == 0 else 999
        random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(32, 3))
        opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 3e-3},
                                 {"params": model[3].parameters(), "lr": 1e-3}], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)], milestones=[4])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=5)
        data_rng = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                            generator=data_rng if mode == "generator" else None)

        store = ckptstore.open_store(store_path, create=True)
        step, skip, epoch_start_rng = 0, 0, None
        if start:
            extra = ct.restore(store, "run@latest", model, opt, sched, scaler, rng=restore_rng)
            step = int(extra["step"])
            assert step == start, (step, start)
            if mode == "generator":
                epoch_start_rng, skip = extra["epoch_start_rng"], int(extra["batches_into_epoch"])

        losses = []
        while step < stop:
            if mode == "generator":
                if skip:  # resume mid-epoch: replay this epoch's shuffle, skip the batches already trained on
                    data_rng.set_state(epoch_start_rng)
                else:
                    epoch_start_rng = data_rng.get_state()
            batches = iter(loader)
            for _ in range(skip):
                next(batches)
            done_in_epoch, skip = skip, 0
            for xb, yb in batches:
                model.train()
                xb = xb + torch.from_numpy(np.random.normal(0.0, 0.05, size=tuple(xb.shape)).astype(np.float32))
                weight = random.uniform(0.5, 1.5)
                loss = F.cross_entropy(model(xb), yb) * weight
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                losses.append(loss.item())
                step += 1
                done_in_epoch += 1
                if step == stop:
                    break
            if step == stop and mode == "generator" and done_in_epoch < STEPS_PER_EPOCH:
                skip = done_in_epoch

        if start == 0 and out.endswith(".save"):
            extra = {"step": step}
            if mode == "generator":
                extra.update(epoch_start_rng=epoch_start_rng, batches_into_epoch=skip)
            ct.save(store, "run", step, model, opt, sched, scaler, extra=extra, metrics={"train_loss": losses[-1]})
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "lr": [g["lr"] for g in opt.param_groups]}, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump({"losses": [v.hex() for v in losses], "step": step}, f)


    for spec in json.loads(sys.argv[1]):  # several independent runs per process: imports are the slow part
        job(**spec)
    """
)
N = {"global": 12, "generator": 9}  # resume at an epoch boundary (6 steps an epoch) / in the middle of one


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def _start(script: Path, jobs: list[dict[str, Any]]) -> Any:
    argv = [sys.executable, str(script), json.dumps(jobs)]
    return subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: Any) -> None:
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log


def _result(out: Path) -> tuple[list[str], dict[str, Any]]:
    res = json.loads(Path(f"{out}.json").read_text())
    return res["losses"], torch.load(f"{out}.pt", weights_only=True)


def _assert_bits(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and ct.same_bits(got, want), f"{path} differs"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_bits(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_bits(a, b, f"{path}/{i}")
    elif isinstance(want, float):
        assert float(got).hex() == want.hex(), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per mode: 2N steps in one go; N steps + save; restore in a new process + N steps; the same without RNG.

    Three processes in all (the first two side by side): each holds one run of each mode, freshly seeded.
    """
    d = tmp_path_factory.mktemp("resume")
    script = d / "loop.py"
    script.write_text(LOOP)

    def spec(mode: str, start: int, stop: int, out: str, rng: bool = True) -> dict[str, Any]:
        store = d / f"store-{mode}" if out != "whole" else d / f"scratch-{mode}"
        return {"mode": mode, "store_path": str(store), "start": start, "stop": stop,
                "out": str(d / f"{mode}-{out}"), "restore_rng": rng}  # fmt: skip

    whole = _start(script, [spec(m, 0, 2 * n, "whole") for m, n in N.items()])
    first = _start(script, [spec(m, 0, n, "first.save") for m, n in N.items()])
    _wait(first)
    second = _start(
        script,
        [spec(m, n, 2 * n, "second") for m, n in N.items()] + [spec("generator", N["generator"], 18, "control", False)],
    )
    _wait(whole)
    _wait(second)
    return d


@pytest.mark.parametrize("mode", list(N), ids=["epoch-boundary", "mid-epoch"])
def test_resume_in_new_process_is_bit_identical(resume_runs: Path, mode: str) -> None:
    n = N[mode]
    whole_losses, whole_state = _result(resume_runs / f"{mode}-whole")
    first_losses, _ = _result(resume_runs / f"{mode}-first.save")
    second_losses, second_state = _result(resume_runs / f"{mode}-second")

    assert len(whole_losses) == 2 * n and len(first_losses) == len(second_losses) == n
    assert first_losses == whole_losses[:n], "the first half is not reproducible across processes"
    assert second_losses == whole_losses[n:], "resumed losses differ from uninterrupted training"
    _assert_bits(second_state, whole_state)
    # the schedule and the AMP scale really moved during the run, so restoring them mattered
    assert whole_state["scaler"]["scale"] > 2.0**8
    assert whole_state["lr"] != [3e-3, 1e-3]

    m = ckptstore.open_store(resume_runs / f"store-{mode}").resolve("run@latest")
    assert m.step == n and m.metadata["step"] == n and len(m.metadata["lr"]) == 2
    assert m.metadata["counters"]["optimizer_steps"] == n
    assert float.fromhex(first_losses[-1]) == m.metadata["metrics"]["train_loss"]


def test_resume_without_rng_states_diverges(resume_runs: Path) -> None:
    """The control: the same resume with ``rng=False`` must not match, or the comparison above proves nothing."""
    whole_losses, whole_state = _result(resume_runs / "generator-whole")
    control_losses, control_state = _result(resume_runs / "generator-control")
    n = N["generator"]
    assert len(control_losses) == n
    assert control_losses != whole_losses[n:]
    assert not ct.same_bits(control_state["model"]["3.weight"], whole_state["model"]["3.weight"])


# ------------------------------------------------------------------------------ restore in a live process
def _net() -> tuple[Any, Any]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def _train(net: Any, opt: Any, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = net(torch.randn(4, 6, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_restored_optimizer_owns_its_state(tmp_path: Path) -> None:
    """ckptstore.torch.restore gives the optimizer tensors of its own: training after a restore changes neither
    what the same store instance loads next nor the deltas of the next save, and each parameter's AdamW ``step``
    counter advances once per step (equal counters are stored as one object)."""
    store = ckptstore.create_store(tmp_path / "s")
    net, opt = _net()
    _train(net, opt, 3, seed=1)
    ct.save(store, "r", 3, net, opt)
    saved = store.load("r@3", tensors="torch")["optimizer"]

    net2, opt2 = _net()
    ct.restore(store, "r@3", net2, opt2)
    steps = [st["step"] for st in opt2.state.values()]
    assert len({t.data_ptr() for t in steps}) == len(steps), "restored step counters share memory"
    _train(net2, opt2, 2, seed=2)
    assert {float(t) for t in steps} == {5.0}
    again = store.load("r@3", tensors="torch")["optimizer"]
    _assert_bits(again, saved, "optimizer")

    _train(net, opt, 2, seed=2)  # the uninterrupted reference
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert ct.same_bits(a, b)
    ct.save(store, "r", 5, net2, opt2)
    fresh = ckptstore.open_store(tmp_path / "s")
    assert fresh.verify()["ok"]
    _assert_bits(fresh.load("r@5", tensors="torch")["model"], dict(net2.state_dict()), "model")
    _assert_bits(fresh.load("r@5", tensors="torch")["optimizer"]["state"], _plain_state(opt2), "state")


def _plain_state(opt: Any) -> dict[int, Any]:
    return {k: dict(v) for k, v in opt.state_dict()["state"].items()}


def test_rng_states_round_trip_through_the_store(tmp_path: Path) -> None:
    """python, numpy and torch RNG streams continue exactly where they were saved."""
    import random

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)  # move them off their seeds; numpy caches a gaussian
    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, {"rng": ct.rng_state()})
    want = (random.random(), random.gauss(0, 1), np.random.normal(size=3).tolist(), torch.rand(4).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ct.set_rng_state(ckptstore.open_store(tmp_path / "s").load("r@1", tensors="torch")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.normal(size=3).tolist(), torch.rand(4).tolist())
    assert got == want
