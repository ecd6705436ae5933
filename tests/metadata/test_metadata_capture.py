"""Capture: what a training process records about itself (LR per param group, counters, AMP scale, versions,
hardware, git state of the training code), and what ``ckptstore.torch.save`` stores with one ``metrics=``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = importlib.import_module("torch")

import ckptstore  # noqa: E402
from ckptstore import metadata as md  # noqa: E402
from ckptstore import torch as ct  # noqa: E402
from ckptstore.errors import InvalidMetadataError  # noqa: E402


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull}  # fmt: skip
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "code"
    r.mkdir()
    _git(r, "init", "-q", "-b", "exp")
    (r / "train.py").write_text("print('train')\n")
    _git(r, "add", "train.py")
    _git(r, "commit", "-q", "-m", "first")
    md._git_state_at.cache_clear()
    return r


def _training_objects() -> tuple[Any, Any, Any, Any]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": net[0].parameters(), "lr": 1e-3}, {"params": net[2].parameters(), "lr": 2e-4}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        loss = net(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    return net, opt, sched, scaler


def test_git_state_clean_then_dirty(repo: Path) -> None:
    head = _git(repo, "rev-parse", "HEAD").strip()
    state = md.git_state(repo / "train.py")
    assert state == {"commit": head, "dirty": False, "branch": "exp", "repo": str(repo.resolve())}
    (repo / "train.py").write_text("print('changed')\n")
    (repo / "untracked.txt").write_text("not code\n")
    md._git_state_at.cache_clear()  # a process records the state once, at its first save
    assert md.git_state(repo) == {**state, "dirty": True}
    assert md.validate({"code": md.git_state(repo)})["code"]["dirty"] is True


def test_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert md.git_state(tmp_path) is None
    assert "code" not in md.capture(1, code_dir=tmp_path)


def test_capture_reads_the_training_objects(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    _, opt, sched, scaler = _training_objects()
    meta = md.capture(3, opt, sched, scaler, code_dir=repo)
    assert meta["schema"] == md.SCHEMA_VERSION and meta["step"] == 3
    assert meta["lr"] == [g["lr"] for g in opt.param_groups] == [5e-4, 1e-4]  # StepLR halved both after 2 steps
    assert meta["counters"] == {"optimizer_steps": 3, "scheduler_steps": 3}
    assert meta["loss_scale"] == scaler.get_scale() == 1024.0
    assert meta["command"] == sys.argv
    v = meta["versions"]
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert v["numpy"] == np.__version__ and v["ckptstore"] == ckptstore.__version__
    assert "cuda" in v and v["cuda"] == torch.version.cuda
    import importlib.metadata

    assert v["open_clip"] == importlib.metadata.version("open_clip_torch")
    hw = meta["hardware"]
    assert hw["world_size"] == 4 and hw["rank"] == 2 and hw["cpu_count"] == os.cpu_count()
    assert hw["accelerator"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert meta["code"]["commit"] == _git(repo, "rev-parse", "HEAD").strip()
    assert md.validate(meta) == meta


def test_callers_values_win_and_merge(repo: Path) -> None:
    _, opt, _, _ = _training_objects()
    ns = argparse.Namespace(lr=1e-3, data=Path("/data/x"), betas=(0.9, 0.98), nan=float("nan"))
    meta = md.capture(
        10, opt, metadata={"lr": [9.0], "hardware": {"node": "n7"}, "step": 11}, metrics={"acc": torch.tensor(0.5)},
        hparams=ns, code_dir=repo,
    )  # fmt: skip
    assert meta["lr"] == [9.0] and meta["step"] == 11
    assert meta["hardware"]["node"] == "n7" and meta["hardware"]["world_size"] >= 1  # nested dicts merge
    assert meta["metrics"] == {"acc": 0.5} and type(meta["metrics"]["acc"]) is float
    assert meta["hparams"] == {"lr": 1e-3, "data": "/data/x", "betas": [0.9, 0.98], "nan": None}
    md.validate(meta)


def test_torch_save_records_metadata_and_metrics(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.setattr(md, "_main_dir", lambda: repo)  # as if the training script lived in the checkout
    store = ckptstore.create_store(tmp_path / "s")
    net, opt, sched, scaler = _training_objects()
    ct.save(store, "run", 3, net, opt, sched, scaler, metadata={"epoch": 1, "tags": ["warm"]},
            metrics={"val_loss": torch.tensor(0.25), "acc": np.float32(0.75), "n": 3})  # fmt: skip
    meta = ckptstore.open_store(tmp_path / "s").resolve("run@latest").metadata
    assert meta["step"] == 3 and meta["epoch"] == 1 and meta["tags"] == ["warm"]
    assert meta["metrics"] == {"val_loss": 0.25, "acc": 0.75, "n": 3}
    assert meta["lr"] == [5e-4, 1e-4] and meta["counters"]["optimizer_steps"] == 3
    assert meta["code"]["commit"] == _git(repo, "rev-parse", "HEAD").strip()
    assert {"python", "torch", "numpy"} <= set(meta["versions"])
    state = store.load("run@3", tensors="torch")
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "rng"}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


def test_torch_save_without_capture(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    net, opt, _, _ = _training_objects()
    ct.save(store, "run", 1, net, opt, metadata={"epoch": 0}, metrics={"acc": torch.tensor(1.0)}, capture=False)
    assert store.resolve("run@1").metadata == {"epoch": 0, "metrics": {"acc": 1.0}}


def test_torch_save_refuses_bad_metrics_before_writing(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    net, opt, _, _ = _training_objects()
    with pytest.raises(InvalidMetadataError) as ei:
        ct.save(store, "run", 1, net, opt, metrics={"val_loss": torch.tensor(float("nan"))})
    assert ei.value.field == "metrics.val_loss"
    assert store.steps("run") == [] and not list((tmp_path / "s").glob("packs/**/*.pack"))


def test_import_ckptstore_does_not_import_torch() -> None:
    code = (
        "import sys, ckptstore, ckptstore.metadata, ckptstore.query, ckptstore.cli.meta_cmds\n"
        "from ckptstore.cli.main import build_parser\n"
        "build_parser()\n"
        "m = ckptstore.metadata.capture(1)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'torch' in m['versions'] and m['hardware']['accelerator'] == 'cpu'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert json.dumps(md.capture(1, git=False))  # plain JSON
