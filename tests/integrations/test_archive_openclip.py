"""The lossy archive tier on a real ``open_clip_train`` run (the cached 20-epoch tiny-CLIP trajectory, first 3
epochs): ``ckpt archive --keep last:1`` converts epochs 1-2; every converted tensor is within its recorded bound of
the trainer's file; a release names and describes the lossy folders as LOSSY, and open_clip loads them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
for _m in ("open_clip_train", "pandas", "matplotlib", "safetensors", "sklearn"):
    pytest.importorskip(_m)

from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.store import open_store  # noqa: E402

pytestmark = pytest.mark.slow
EPOCHS = 3


def ckpt(*argv: str) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = ckpt_main(list(argv))
    assert rc == 0, out.getvalue()
    return json.loads(out.getvalue()) if "--json" in argv else out.getvalue()


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ckpts = tj.ensure_trajectory(epochs=20, size="tiny", n_images=128)
    path = tmp_path_factory.mktemp("ar") / "s.ckpt"
    ckpt("ingest", *[str(ckpts / f"epoch_{e}.pt") for e in range(1, EPOCHS + 1)], "--store", str(path), "--init",
         "--run", "r", "--json")  # fmt: skip
    res = ckpt("archive", "r", "--store", str(path), "--keep", "last:1", "--json")
    assert res["converted"] == ["r@1", "r@2"] and res["freed_bytes"] > 0
    return path, ckpts


def test_converted_tensors_are_within_the_recorded_bound_of_the_trainer_files(archived: tuple[Path, Path]) -> None:
    path, ckpts = archived
    store = open_store(path)
    assert store.verify()["ok"]
    for e in range(1, EPOCHS + 1):
        original = torch.load(ckpts / f"epoch_{e}.pt", map_location="cpu", weights_only=True)
        m = store.manifest("r", e)
        rec = (m.data.get("lossy") or {}).get("tensors", {})
        assert bool(rec) == (e < EPOCHS)
        got = store.load(f"r@{e}", tensors="torch")
        for k, v in original["state_dict"].items():
            a, b = v.double().numpy(), got["state_dict"][k].double().numpy()
            name = f"state_dict/{k}"
            if name in rec:
                assert np.all(np.abs(a - b) <= rec[name]["eps"]), (e, k)
            else:
                assert torch.equal(v, got["state_dict"][k]), (e, k)
        for i, st in original["optimizer"]["state"].items():
            x = st["exp_avg_sq"].double().numpy()
            y = got["optimizer"]["state"][i]["exp_avg_sq"].double().numpy()
            bound = rec[f"optimizer/state/{i}/exp_avg_sq"]["bound"]["value"] if rec else 0.0
            assert np.all(np.abs(x - y) <= bound * np.abs(x)), (e, i)


def test_release_labels_lossy_checkpoints(archived: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = archived
    out = tmp_path / "rel"
    info = ckpt("release", "r", "--store", str(path), "--refs", "1", "3", "--out", str(out), "--json")
    folders = [c["folder"] for c in info["checkpoints"]]
    assert folders[0].endswith("-lossy") and not folders[1].endswith("-lossy")
    card = (out / "README.md").read_text()
    assert "**LOSSY**" in card and f"`{folders[0]}`" in card and "except in the LOSSY folders" in card
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / folders[0]}")
    assert model is not None


def _val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    return float(rows[-1]["clip_val_loss"])


def test_resuming_open_clip_train_from_a_lossy_checkpoint(archived: tuple[Path, Path], tmp_path: Path) -> None:
    """One more epoch from the lossy epoch 2 reaches the validation loss of one more epoch from the original."""
    path, ckpts = archived
    lossy = tmp_path / "e2.lossy.pt"
    ckpt("export", "r@2", "--store", str(path), "-O", str(lossy))
    losses = {}
    for name, src in (("lossless", ckpts / "epoch_2.pt"), ("lossy", lossy)):
        _p, run_dir = tj.run_open_clip_train(tmp_path / name, epochs=EPOCHS, size="tiny", n_images=128,
                                             val_samples=128, name=name, extra_args=["--resume", str(src)])  # fmt: skip
        assert "=> resuming checkpoint" in (run_dir / "out.log").read_text()
        losses[name] = _val_loss(run_dir)
    assert abs(losses["lossy"] - losses["lossless"]) <= 0.01 * losses["lossless"], losses
