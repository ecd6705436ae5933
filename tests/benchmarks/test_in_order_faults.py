"""benchmarks/in_order_faults.py end to end on a small run: both sides' passes, their page faults and the ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ckptstore

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "in_order_faults.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_in_order_faults_times_both_sides_kept_and_streamed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    pts = tmp_path / "pt"
    pts.mkdir()
    w = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MB: a pooled buffer, delta against the one before
    for epoch in (1, 2, 3):
        w = w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
        state = {"state_dict": {"w": torch.from_numpy(w.copy()), "b": torch.arange(7.0)}, "epoch": epoch}
        store.save("r", epoch, state)
        torch.save(state, pts / f"epoch_{epoch}.pt")
    store.close()
    for extra, form in (([], "kept"), (["--streamed"], "streamed")):
        out = tmp_path / f"{form}.json"
        base = ["--store", str(tmp_path / "s"), "--run", "r", "--checkpoints", str(pts)]
        res = _run([*base, "--pairs", "2", "--json", str(out), *extra])
        assert res.returncode == 0, res.stderr
        rep = json.loads(out.read_text())
        assert rep["form"] == form and len(rep["passes"]["ours"]) == len(rep["passes"]["torch"]) == 2
        assert all(p["wall"] > 0 and p["faults"] >= 0 for side in rep["passes"].values() for p in side)
        assert rep["ratio"] == rep["medians"]["ours"]["wall"] / rep["medians"]["torch"]["wall"]
        assert f"{form}, medians from pair 1 on" in res.stdout


def test_in_order_faults_refuses_a_folder_that_does_not_match_the_run(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, {"w": np.zeros(4, np.float32)})
    store.close()
    (tmp_path / "pt").mkdir()
    res = _run(["--store", str(tmp_path / "s"), "--run", "r", "--checkpoints", str(tmp_path / "pt")])
    assert res.returncode == 2 and "does not hold one checkpoint per epoch_N.pt" in res.stderr
