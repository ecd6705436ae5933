"""Crash sweep (issue 14, item 1), small: SIGKILL at every write point of a gc (a repack and an orphan removal),
at every 16th point of a compaction, at random moments of saves and async saves; and on a moto S3 server at the
write points of a save's multipart upload and commit. The full sweep is ``benchmarks/crash_sweep.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptstore.testing import crash

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crash") / "base"
    crash.base_store(path)
    return path


def test_kills_at_every_gc_write_point_and_during_saves(base: Path, tmp_path: Path) -> None:
    res = crash.sweep(base, tmp_path / "work", random_kills=4, ops=("gc", "save", "async"), points=False)
    assert res["failures"] == 0, res["failed_trials"][:3]
    res = crash.sweep(base, tmp_path / "work", ops=("gc",))
    assert res["failures"] == 0, res["failed_trials"][:3]
    assert res["by_op"]["gc"]["write_points"] >= 10  # the repack writes a pack and rewrites a manifest
    assert res["killed"] == res["by_op"]["gc"]["write_points"] == res["mid_op"]  # every per-point kill hit


def test_kills_during_compaction(base: Path, tmp_path: Path) -> None:
    res = crash.sweep(base, tmp_path / "work", ops=("compact",), every=16)
    assert res["failures"] == 0, res["failed_trials"][:3]
    assert res["by_op"]["compact"]["write_points"] >= 50  # three checkpoints re-encoded, committed, then a gc
    assert res["outcomes"]["mixed"] > 0  # some kills landed between two checkpoints' commits


def test_kills_at_s3_write_points_of_a_save(base: Path, tmp_path: Path) -> None:
    """Point 4 of an S3 save, in its multipart upload (the save dies mid-upload: old state, and gc aborts the
    dead upload and leaves nothing), and its last point, a lock's release after the commit (new state). The
    number of points varies by a lease renewal or two with the save's duration (so the last point is counted
    again, up to three times, until the kill lands on a release); every point is in
    benchmarks/crash_sweep.py --backend s3."""
    with crash.target("s3", base, tmp_path / "work") as tg:
        truth = crash.truth_of(base)
        n, _ = crash.count_points(tg, "save")
        assert n >= 8  # locks, upload start, 3 parts, completion, the manifest, releases
        trials = [crash.run_trial(tg, "save", truth, kill_at=4)]
        for _ in range(3):
            last = crash.run_trial(tg, "save", truth, kill_at=n)
            if last.point.startswith("delete"):
                break
            n, _ = crash.count_points(tg, "save")  # a renewal more or less than the count: count again
        trials.append(last)
    assert [t.failures for t in trials] == [[]] * 2
    assert all(t.killed and t.mid_op for t in trials)
    assert trials[1].point.startswith("delete"), trials[1].point  # a lock's release, after the commit
    assert [t.outcome for t in trials] == ["old", "new"]
