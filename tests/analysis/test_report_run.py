"""``report_run``: ``ckpt report`` as a library call (no argparse), giving the same record as the command."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ckptstore.analysis.report.run import report_run
from ckptstore.cli.main import main as ckpt
from ckptstore.errors import CkptStoreError
from ckptstore.store import open_store


def test_report_run_matches_ckpt_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(tmp_path / "s", create=True)
    rng = np.random.default_rng(0)
    w = {"fc.weight": rng.normal(size=(8, 4)).astype(np.float32)}
    for step in range(3):
        w = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in w.items()}
        store.save("mlp", step, {"model": w}, metadata={"step": step, "metrics": {"acc": 0.2 * step}})
    stages: list[str] = []

    @contextmanager
    def progress(stage: str) -> Iterator[Callable[[int, int], None]]:
        stages.append(stage)
        yield lambda done, total: None

    report = report_run(store, "mlp", representations=False, transfer=False, spectral=False, progress=progress)
    assert stages == ["weights"]
    assert set(report.results) == {"weights", "stability"} and "transfer" in report.skipped
    page = report.write(tmp_path / "r.html")
    assert page.exists() and "<html" in page.read_text() and "<html" in report.html()
    blob = report.json()
    assert ckpt(["report", "mlp", "-s", str(tmp_path / "s"), "--json", "--no-representations", "--no-transfer",
                 "--no-spectral"]) == 0  # fmt: skip
    cli_blob = json.loads(capsys.readouterr().out)
    for key in ("run", "points", "weights", "stability", "skipped", "curves"):
        assert cli_blob[key] == blob[key], key


def test_report_run_needs_a_store_for_a_run_name(tmp_path: Path) -> None:
    with pytest.raises(CkptStoreError, match="no store was given"):
        report_run(None, "not-a-folder")
