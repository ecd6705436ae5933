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


def _stable(blob: dict) -> dict:
    """The report's JSON without what differs between two runs of it: the time it was made, the seconds taken."""
    out = {k: v for k, v in blob.items() if k != "generated"}
    for key in ("representations", "transfer"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "seconds"}
    return out


@pytest.mark.slow
def test_the_ckpt_program_gives_the_record_of_a_process_with_open_clip_imported_in_full(tmp_path: Path) -> None:
    """``ckpt report`` as a program imports open_clip without transformers and timm and ends without the
    interpreter's teardown (issue 17 item 3): its JSON equals, value for value, ``report_run`` in this process,
    where open_clip is imported in full."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    pytest.importorskip("open_clip_train")
    pytest.importorskip("sklearn")
    import open_clip  # noqa: F401  (in full: transformers and timm too, as before)

    from ckptstore.demo import trajectory as tj

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    store = tmp_path / "store"
    assert ckpt(["ingest", "-s", str(store), "--init", str(ckpts), "--run", "demo"]) == 0
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptstore.cli", "report", "demo", "-s", str(store), "--json", "-O",
         str(tmp_path / "r.html")],
        capture_output=True, text=True, timeout=900, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    program = _stable(json.loads(proc.stdout))
    here = _stable(report_run(open_store(store), "demo").json())
    assert set(program) == set(here)
    for key in here:
        assert program[key] == here[key], key
    assert program["representations"]["zero_shot"] and program["transfer"]["accuracy"]  # the model sections ran
    assert (tmp_path / "r.html").read_text().count("data:image/png;base64,") >= 8
