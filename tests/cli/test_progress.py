"""Progress when stderr is not a terminal (a pipe, CI, a log file): a plain line at most every PROGRESS_EVERY
seconds with the count and an ETA, and a line per stage of ``ckpt report``."""

from __future__ import annotations

import time

import pytest

from ckptstore.cli import common


def test_piped_progress_prints_counts_and_an_eta(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(common, "PROGRESS_EVERY", 0.0)
    with common.progress_bar("encoding tensors") as update:
        for done in range(1, 4):
            time.sleep(0.01)
            update(done, 4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert err[0].startswith("  encoding tensors: 1/4, ") and "s left" in err[0]
    assert err[-1].startswith("  encoding tensors: 3/4, ")


def test_piped_progress_is_throttled(capsys: pytest.CaptureFixture[str]) -> None:
    with common.progress_bar("verifying") as update:
        for done in range(1000):
            update(done, 1000)
    assert capsys.readouterr().err == ""  # well under PROGRESS_EVERY: no line at all


def test_stage_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with common.stage("weight dynamics", "ckpt report"):
        pass
    assert capsys.readouterr().err.splitlines() == [
        "ckpt report: weight dynamics ...",
        "ckpt report: weight dynamics: done in 0.0 s",
    ]
