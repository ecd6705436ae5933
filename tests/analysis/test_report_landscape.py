"""The report's averages / interpolation / optimizer / plasticity sections: shown when given, in the JSON, escaped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
torch = pytest.importorskip("torch")

from ckptstore.analysis import (  # noqa: E402
    MemoryTrajectory,
    analyze_interpolation,
    analyze_optimizer,
    analyze_plasticity,
    build_report,
    report_json,
)
from ckptstore.analysis.trajectory import StoreTrajectory  # noqa: E402


@pytest.fixture(scope="module")
def run(adam_store: Path) -> StoreTrajectory:
    from ckptstore import open_store

    return StoreTrajectory(open_store(adam_store), "r")


def test_sections_in_page_and_json(run: StoreTrajectory) -> None:
    opt = analyze_optimizer(run)
    pl = analyze_plasticity(run, dormant=False)
    traj = MemoryTrajectory([{"w": np.ones(3)}, {"w": np.zeros(3)}], labels=["a<i>", "b"])
    interp = analyze_interpolation(traj, points=3, evaluate=lambda sd: {"loss": float(sd["w"].sum())})
    avg = {"run": "r", "candidates": [{"name": "last", "refs": ["r@4"], "loss": 1.0}], "best": {"loss": "last"}}
    extra = {"optimizer": opt, "plasticity": pl, "interpolation": interp, "averages": avg}
    page = build_report(run, extra=extra)
    for sec in ("averages", "interpolation", "optimizer", "plasticity"):
        assert f'<section id="{sec}">' in page
    assert "a&lt;i&gt;" in page and "<i>" not in page.replace("<img", "")
    assert page.count("data:image/png;base64,") >= 3
    blob = report_json(run, extra=extra)
    json.dumps(blob, allow_nan=False)
    assert blob["optimizer"] == json.loads(json.dumps(opt.to_dict()))
    assert blob["averages"] == avg and "plasticity" in blob
    plain = build_report(run)
    assert '<section id="optimizer">' not in plain and "optimizer" not in report_json(run)


def test_cli_report_with_optimizer(run: StoreTrajectory, tmp_path: Path) -> None:
    url = run.store.url
    out = tmp_path / "r.html"
    res = subprocess.run(
        [sys.executable, "-m", "ckptstore.cli", "report", "-s", url, "r", "--with", "optimizer", "--with",
         "plasticity", "--no-representations", "--no-transfer", "-O", str(out), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    blob = json.loads(res.stdout)
    assert blob["optimizer"]["mapping"] == "state-dict order" and blob["plasticity"]["dormant"] == {}
    assert '<section id="optimizer">' in out.read_text()
    assert "plasticity without dormant units" in res.stderr
