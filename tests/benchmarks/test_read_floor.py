"""benchmarks/read_floor.py end to end on a small run: it times the C work of real reads (its instrumentation
follows the decode path's internal names, so a rename there must break this, not the benchmark's figures)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ckptstore


def test_read_floor_reports_c_work_of_in_order_and_single_reads(
    tmp_path: Path, small_run: tuple[Path, Path], run_benchmark: Callable[..., Any]
) -> None:
    store, pts = small_run
    out = tmp_path / "floor.json"
    res = run_benchmark(
        "read_floor.py", "--store", str(store), "--run", "r", "--checkpoints", str(pts), "--reps", "1",
        "--json", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.read_text())
    in_order = rep["in_order"]
    parts = set(in_order["c_parts"])
    assert in_order["c_cpu"] > 0 and "xxh3" in parts and parts & {"zstd", "decode_many"}, parts
    assert in_order["floor"] == in_order["c_cpu"] / rep["cores"]
    assert set(rep["single"]) == {"1", "2", "3"}
    assert all(r["c_parts"]["xxh3"] > 0 and r["torch"] > 0 for r in rep["single"].values())
    assert "older singles" in res.stdout


def test_read_floor_refuses_a_folder_that_does_not_match_the_run(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, {"w": np.zeros(4, np.float32)})
    store.close()
    (tmp_path / "pt").mkdir()
    res = run_benchmark(
        "read_floor.py", "--store", str(tmp_path / "s"), "--run", "r", "--checkpoints", str(tmp_path / "pt")
    )
    assert res.returncode == 2 and "has 0 checkpoints, run 'r' has 1" in res.stderr
