"""The weights-only tier on a real ``open_clip_train`` run (the cached 20-epoch tiny-CLIP trajectory, first 3
epochs): ``ckpt thin --keep last:1 --keep-weights all`` drops the optimizer state of epochs 1-2, the weights stay
bit-identical to the trainer's files, ``ckpt export`` writes a ``.pt`` without ``optimizer`` that open_clip
loads (and says what it is), and the unmodified ``open_clip_train --resume`` of it stops — with
``KeyError: 'optimizer'``, which ckptstore cannot change in the trainer, so the export warns first.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")
pytest.importorskip("pandas")

from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.torch import same_bits  # noqa: E402

pytestmark = pytest.mark.slow
EPOCHS = 3


def ckpt(*argv: str) -> tuple[Any, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ckpt_main(list(argv))
    assert rc == 0, out.getvalue() + err.getvalue()
    return json.loads(out.getvalue()) if "--json" in argv else out.getvalue(), err.getvalue()


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def thinned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ckpts = tj.ensure_trajectory(epochs=20, size="tiny", n_images=128)
    path = tmp_path_factory.mktemp("wo") / "s.ckpt"
    files = [str(ckpts / f"epoch_{e}.pt") for e in range(1, EPOCHS + 1)]
    ckpt("ingest", *files, "--store", str(path), "--init", "--run", "r", "--json")
    res, _ = ckpt("thin", "r", "--store", str(path), "--keep", "last:1", "--keep-weights", "all", "--json")
    assert res["slimmed"] == ["r@1", "r@2"] and res["freed_bytes"] > 0
    return path, ckpts


def test_export_of_a_weights_only_checkpoint(thinned: tuple[Path, Path], tmp_path: Path) -> None:
    path, ckpts = thinned
    out = tmp_path / "e1.pt"
    _text, warning = ckpt("export", "r@1", "--store", str(path), "-O", str(out))
    assert "weights only" in warning and "open_clip_train --resume" in warning
    got, want = load(out), load(ckpts / "epoch_1.pt")
    assert "optimizer" not in got and list(got) == [k for k in want if k != "optimizer"]
    for k, v in want["state_dict"].items():
        assert same_bits(got["state_dict"][k], v), k
    as_json, _ = ckpt("export", "r@1", "--store", str(path), "-O", str(tmp_path / "e1b.pt"), "--json")
    assert as_json["dropped"] == ["optimizer"]
    # the complete checkpoint exports as before, optimizer and all
    _full, warning = ckpt("export", "r@3", "--store", str(path), "-O", str(tmp_path / "e3.pt"))
    assert warning == "" and "optimizer" in load(tmp_path / "e3.pt")
    # open_clip loads the weights-only file as a pretrained model
    open_clip.add_model_config(tj.write_model_configs(tmp_path / "model_configs"))
    model, _, _ = open_clip.create_model_and_transforms(tj.model_name("tiny"), pretrained=str(out))
    sd = model.state_dict()
    for k, v in want["state_dict"].items():
        assert same_bits(sd[k.removeprefix("module.")], v), k


def test_open_clip_train_resume_of_a_weights_only_export_stops(thinned: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = thinned
    out = tmp_path / "e1.pt"
    ckpt("export", "r@1", "--store", str(path), "-O", str(out))
    with pytest.raises(tj.TrainingRunError) as info:
        tj.run_open_clip_train(tmp_path / "resume", epochs=EPOCHS, size="tiny", n_images=128, val_samples=0,
                               name="resumed", extra_args=["--resume", str(out)])  # fmt: skip
    # what the unmodified trainer does with it: it stops before training, on the missing optimizer state
    assert "KeyError: 'optimizer'" in str(info.value)
    assert not list((tmp_path / "resume" / "logs" / "resumed" / "checkpoints").glob("epoch_*.pt"))
