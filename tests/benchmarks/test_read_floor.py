"""benchmarks/read_floor.py end to end on a small run: it times the C work of real reads (its instrumentation
follows the decode path's internal names, so a rename there must break this, not the benchmark's figures)."""

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


def test_read_floor_reports_c_work_of_in_order_and_single_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    pts = tmp_path / "pt"
    pts.mkdir()
    w = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MB: coded, delta against the one before
    for epoch in (1, 2, 3):
        w = w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
        state = {"state_dict": {"w": torch.from_numpy(w.copy()), "b": torch.arange(7.0)}, "epoch": epoch}
        store.save("r", epoch, state)
        torch.save(state, pts / f"epoch_{epoch}.pt")
    store.close()
    out = tmp_path / "floor.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "read_floor.py"), "--store", str(tmp_path / "s"), "--run", "r",
           "--checkpoints", str(pts), "--reps", "1", "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.read_text())
    in_order = rep["in_order"]
    parts = set(in_order["c_parts"])
    assert in_order["c_cpu"] > 0 and "xxh3" in parts and parts & {"zstd", "decode_many"}, parts
    assert in_order["floor"] == in_order["c_cpu"] / rep["cores"]
    assert set(rep["single"]) == {"1", "2", "3"}
    assert all(r["c_parts"]["xxh3"] > 0 and r["torch"] > 0 for r in rep["single"].values())
    assert "older singles" in res.stdout


def test_read_floor_refuses_a_folder_that_does_not_match_the_run(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, {"w": np.zeros(4, np.float32)})
    store.close()
    (tmp_path / "pt").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "read_floor.py"), "--store", str(tmp_path / "s"), "--run", "r",
           "--checkpoints", str(tmp_path / "pt")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "has 0 checkpoints, run 'r' has 1" in res.stderr
