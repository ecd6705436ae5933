"""Fixtures shared by the analysis tests."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def adam_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with run ``r``: four real Adam steps of a tiny MLP (model + optimizer state each step)."""
    torch = pytest.importorskip("torch")
    from ckptstore import create_store

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    path = tmp_path_factory.mktemp("adam") / "s"
    store = create_store(path)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    for step in range(1, 5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        store.save("r", step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    return path


def _make_demo_report(folder: Path) -> None:
    """The demo run ingested with ``ckpt ingest --init``, then ``ckpt report demo -O report.html`` (both through
    the CLI's ``main``), its stdout kept in ``stdout.txt``; ``done.json`` last, once everything is there."""
    from ckptstore.cli.main import main
    from ckptstore.demo import trajectory as tj

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    store = str(folder / "store")
    assert main(["ingest", "-s", store, "--init", str(ckpts), "--run", "demo"]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["report", "demo", "-s", store, "-O", str(folder / "report.html")])
    assert rc == 0
    (folder / "stdout.txt").write_text(out.getvalue())
    (folder / "done.json").write_text(json.dumps({"rc": rc}))


@pytest.fixture(scope="session")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``(page, stdout)`` of ``ckpt report demo -O report.html`` on the cached demo run, made once per test run:
    the full report (representations, transfer, figures) is the costly part of the tests that read it. Under
    pytest-xdist the workers share it through their common temporary root, made under a lock by the first one
    that needs it."""
    for module in ("torch", "open_clip_train", "sklearn"):
        pytest.importorskip(module)
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers (one per run, so never a stale report)
    folder = root / "demo-report"
    with (root / "demo-report.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (folder / "done.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed half-way left
            folder.mkdir()
            _make_demo_report(folder)
    return folder / "report.html", (folder / "stdout.txt").read_text()
