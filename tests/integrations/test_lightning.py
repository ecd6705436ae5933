"""The Lightning callback against the real ``lightning`` on a tiny model on CPU: saving by policy, reasons and
metrics in the metadata, online retention, bit-exact weights, and ``trainer.fit(ckpt_path=export)`` resuming."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

import ckptstore  # noqa: E402
from ckptstore.integrations.lightning import CkptStoreCallback, export_ckpt, storable  # noqa: E402

BATCHES = 4  # per epoch


class Tiny(L.LightningModule):  # type: ignore[misc]
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5)}


def loader() -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * BATCHES, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def trainer(max_epochs: int, callbacks: list[Any]) -> Any:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, CkptStoreCallback]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lightning") / "s.ckpt"
    cb = CkptStoreCallback(path, "lit", policy="epochs:1, last", keep="last:2,best:val_loss")
    model = Tiny()
    trainer(4, [cb]).fit(model, loader(), loader())
    return path, model, cb


def test_saves_by_policy_with_reasons_metrics_and_retention(fitted: tuple[Path, Any, CkptStoreCallback]) -> None:
    path, _model, cb = fitted
    store = ckptstore.open_store(path)
    infos = store.checkpoints("lit")
    steps = [i.step for i in infos]
    # Saved after every epoch (steps 4, 8, 12, 16); online retention kept the last two and the best val_loss.
    assert steps[-2:] == [12, 16] and len(steps) in (2, 3)
    assert cb.recorder is not None and [i.step for i in cb.recorder.saved] == [4, 8, 12, 16]
    losses = {i.step: i.metadata["metrics"]["val_loss"] for i in infos}
    plan = cb.recorder.last_retention
    assert plan is not None
    best = min(plan.entries, key=lambda e: e.metrics["val_loss"])
    assert best.step in steps
    for i in infos:
        assert i.metadata["save_reason"] == f"every 1 epoch (epoch {i.step // BATCHES})"
        assert i.metadata["epoch"] == i.step // BATCHES
        assert i.metadata["source"]["kind"] == "lightning" and i.metadata["hparams"] == {"lr": 0.05}
        assert "train_loss" in i.metadata["metrics"] and losses[i.step] > 0  # validation arrived after the save
        assert i.metadata["save_policy"] == {"kind": "any", "policies": [{"kind": "every_epochs", "n": 1},
                                                                         {"kind": "last"}]}  # fmt: skip
    state = store.load("lit@latest", tensors="torch")
    assert state["global_step"] == 16 and state["epoch"] == 3
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "hyper_parameters"} <= set(state)


def test_stored_weights_are_bit_exact(
    fitted: tuple[Path, Any, CkptStoreCallback], assert_same_state: Callable[[object, object], None]
) -> None:
    path, model, _cb = fitted
    state = ckptstore.open_store(path).load("lit@latest", tensors="torch")
    assert_same_state(state["state_dict"], dict(model.state_dict()))


def test_fit_resumes_from_an_export(fitted: tuple[Path, Any, CkptStoreCallback], tmp_path: Path) -> None:
    path, _model, _cb = fitted
    store = ckptstore.open_store(path)
    ckpt = export_ckpt(store, "lit@12", tmp_path / "lit.ckpt")
    t = trainer(5, [])
    fresh = Tiny()
    t.fit(fresh, loader(), loader(), ckpt_path=str(ckpt))
    assert t.global_step == 5 * BATCHES and t.current_epoch == 5  # epochs 3 and 4 trained after the resume


def test_weight_change_policy_through_the_callback(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cb = CkptStoreCallback(tmp_path / "w.ckpt", "w", policy="first, weights:0.02, last")
    trainer(2, [cb]).fit(Tiny(), loader(), loader())
    store = ckptstore.open_store(tmp_path / "w.ckpt")
    reasons = [i.metadata["save_reason"] for i in store.checkpoints("w")]
    assert reasons[0].startswith("first checkpoint of the run")
    assert any(r.startswith("weights moved") for r in reasons[1:])


def test_storable_makes_lightning_extras_plain() -> None:
    import enum
    import types

    class Color(enum.Enum):
        RED = "red"

    converted: list[str] = []
    out = storable({"p": Path("/x"), "c": Color.RED, "ns": types.SimpleNamespace(a=1), "f": len}, "", converted)
    assert out["p"] == "/x" and out["c"] == "red" and out["ns"] == {"a": 1} and isinstance(out["f"], str)
    assert converted == ["/f"]
