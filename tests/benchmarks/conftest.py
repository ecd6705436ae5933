"""Fixtures of the benchmark scripts' tests: a small run stored and saved as ``epoch_N.pt``, and a runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_run(tmp_path: Path) -> tuple[Path, Path]:
    """A store whose run "r" holds 3 epochs (a 2 MB tensor, delta-coded against the one before, and a small one),
    and the folder of the same states as open_clip_train's ``epoch_N.pt``: (store, folder)."""
    rng = np.random.default_rng(0)
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    pts = tmp_path / "pt"
    pts.mkdir()
    w = rng.standard_normal((512, 1024)).astype(np.float32)
    for epoch in (1, 2, 3):
        w = w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
        state = {"state_dict": {"w": torch.from_numpy(w.copy()), "b": torch.arange(7.0)}, "epoch": epoch}
        store.save("r", epoch, state)
        torch.save(state, pts / f"epoch_{epoch}.pt")
    store.close()
    return tmp_path / "s", pts


@pytest.fixture
def run_benchmark() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_benchmark("read_floor.py", *args)``: the script of benchmarks/ run as a user runs it, this checkout's
    package first on the path."""

    def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    return run
