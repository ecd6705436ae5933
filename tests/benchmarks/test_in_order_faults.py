"""benchmarks/in_order_faults.py end to end on a small run: both sides' passes, their page faults and the ratio."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ckptstore


def test_in_order_faults_times_both_sides_kept_and_streamed(
    tmp_path: Path, small_run: tuple[Path, Path], run_benchmark: Callable[..., Any]
) -> None:
    store, pts = small_run
    for extra, form in (([], "kept"), (["--streamed"], "streamed")):
        out = tmp_path / f"{form}.json"
        base = ["--store", str(store), "--run", "r", "--checkpoints", str(pts)]
        res = run_benchmark("in_order_faults.py", *base, "--pairs", "2", "--json", str(out), *extra)
        assert res.returncode == 0, res.stderr
        rep = json.loads(out.read_text())
        assert rep["form"] == form and len(rep["passes"]["ours"]) == len(rep["passes"]["torch"]) == 2
        assert all(p["wall"] > 0 and p["faults"] >= 0 for side in rep["passes"].values() for p in side)
        assert rep["ratio"] == rep["medians"]["ours"]["wall"] / rep["medians"]["torch"]["wall"]
        assert f"{form}, medians from pair 1 on" in res.stdout


def test_in_order_faults_refuses_a_folder_that_does_not_match_the_run(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, {"w": np.zeros(4, np.float32)})
    store.close()
    (tmp_path / "pt").mkdir()
    res = run_benchmark(
        "in_order_faults.py", "--store", str(tmp_path / "s"), "--run", "r", "--checkpoints", str(tmp_path / "pt")
    )
    assert res.returncode == 2 and "does not hold one checkpoint per epoch_N.pt" in res.stderr
