"""Fixtures shared by the analysis tests."""

from __future__ import annotations

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
