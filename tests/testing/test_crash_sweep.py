"""Crash sweep (issue 14, item 1), small: SIGKILL at every write point of a gc (a repack and an orphan removal)
and at random moments of saves; the full sweep over save, delete, thin and gc is ``benchmarks/crash_sweep.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptstore.testing import crash

pytestmark = pytest.mark.slow


def test_kills_at_every_gc_write_point_and_during_saves(tmp_path: Path) -> None:
    base = tmp_path / "base"
    crash.base_store(base)
    res = crash.sweep(base, tmp_path / "work", random_kills=4, ops=("gc", "save"))
    assert res["failures"] == 0, res["failed_trials"][:3]
    assert res["write_points"]["gc"] >= 10  # the repack writes a pack and rewrites a manifest
    assert res["killed"] >= res["write_points"]["gc"] + res["write_points"]["save"]  # every per-point kill hit
    assert res["outcomes"]["old"] > 0 and res["outcomes"]["new"] > 0
