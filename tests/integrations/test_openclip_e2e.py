"""End to end with the real thing: ``open_clip_train`` writes ``epoch_N.pt``, ``ckpt`` stores and exports them,
and OpenCLIP (the model factory and the trainer's ``--resume``) reads the exports as it reads the originals.

One tiny CPU run (2 epochs on 256 digits) is trained once for the whole module; the store and the exports
made from it are module fixtures too, each built through the ``ckpt`` command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn")
pytest.importorskip("pandas")
pytest.importorskip("safetensors")

from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.torch import same_bits  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS = 2
SIZE = "tiny"
N_IMAGES = 256  # 4 steps of 64 an epoch: seconds, not minutes
RUN = "tiny-csv-e2-s0"  # the run folder's name, which ingest uses as the run name


# ---------------------------------------------------------------------------------------------- helpers


def ckpt(*argv: str) -> tuple[int, str]:
    """Run the ``ckpt`` CLI in this process; return its exit status and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue()


def load(path: Path) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(obj, dict)
    return obj


def strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def assert_same(got: Any, want: Any, path: str = "<root>") -> None:
    """Same containers (keys in the same order at every level), bit-identical tensors, equal plain values."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got).__name__} instead of a tensor"
        assert same_bits(got, want), f"{path}: tensor differs ({got.dtype} {tuple(got.shape)})"
        return
    if isinstance(want, dict):  # torch state dicts are OrderedDicts; a plain dict in the same order is fine
        assert isinstance(got, dict), f"{path}: {type(got).__name__} instead of {type(want).__name__}"
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{path}/{k}")
        return
    assert type(got) is type(want), f"{path}: {type(got).__name__} instead of {type(want).__name__}"
    if isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not math.isnan(want):
        assert struct.pack("<d", got) == struct.pack("<d", want), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, float):
        assert math.isnan(got), f"{path}: {got!r} != nan"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints folder of a real 2-epoch ``open_clip_train`` run of the tiny model."""
    ckpts = tj.ensure_trajectory(
        tmp_path_factory.mktemp("trajectories"), epochs=EPOCHS, size=SIZE, n_images=N_IMAGES, val_samples=0
    )
    for e in range(1, EPOCHS + 1):
        assert (ckpts / f"epoch_{e}.pt").is_file()
    assert ckpts.parent.name == RUN
    return ckpts


@pytest.fixture(scope="module")
def store(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding both epochs, made by ``ckpt ingest --init``."""
    path = tmp_path_factory.mktemp("store") / "ckpt.store"
    rc, out = ckpt("ingest", str(trained), "--store", str(path), "--init", "--json")
    assert rc == 0, out
    rows = json.loads(out)
    assert [Path(r["file"]).name for r in rows] == ["epoch_1.pt", "epoch_2.pt"]
    return path


@pytest.fixture(scope="module")
def exported(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """``ckpt export RUN@epoch=N --format openclip`` of every epoch."""
    out_dir = tmp_path_factory.mktemp("exports")
    out = {}
    for e in range(1, EPOCHS + 1):
        target = out_dir / f"epoch_{e}.pt"
        rc, text = ckpt("export", f"{RUN}@epoch={e}", "--store", str(store), "--format", "pt",
                        "-O", str(target))  # fmt: skip
        assert rc == 0, text
        assert target.is_file()
        out[e] = target
    return out


@pytest.fixture(scope="module")
def registered_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The demo model names, registered in this process the way the training entry registers them."""
    open_clip.add_model_config(tj.write_model_configs(tmp_path_factory.mktemp("model_configs")))
    assert tj.model_name(SIZE) in open_clip.list_models()


# ------------------------------------------------------------------------------------------------ tests


def test_ingest_verify_and_list(store: Path, trained: Path) -> None:
    rc, out = ckpt("verify", "--store", str(store))
    assert rc == 0, out
    rc, out = ckpt("ls", "--store", str(store), "--json")
    assert rc == 0, out
    rows = json.loads(out)
    assert len(rows) == 2
    assert [r["run"] for r in rows] == [RUN, RUN]
    assert [r["epoch"] for r in rows] == [1, 2]
    # open_clip_train 3.x records no global_step, so the epoch is the step.
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["logical_bytes"] > 0 and r["stored_bytes"] > 0 for r in rows)
    second = rows[1]
    assert second["stored_bytes"] < second["logical_bytes"], second
    # Ingesting the same folder again stores nothing new.
    rc, out = ckpt("ingest", str(trained), "--store", str(store), "--json")
    assert rc == 0, out
    assert [r.get("skipped") for r in json.loads(out)] == ["already stored"] * 2


@pytest.mark.parametrize("epoch", range(1, EPOCHS + 1))
def test_export_openclip_is_the_original(epoch: int, trained: Path, exported: dict[int, Path]) -> None:
    original = load(trained / f"epoch_{epoch}.pt")
    got = load(exported[epoch])
    assert list(original)[:4] == ["epoch", "name", "state_dict", "optimizer"]
    assert got["epoch"] == epoch
    assert_same(got, original)


@pytest.mark.usefixtures("registered_models")
def test_export_loads_in_open_clip(trained: Path, exported: dict[int, Path]) -> None:
    epoch = EPOCHS
    model, _preprocess_train, _preprocess_val = open_clip.create_model_and_transforms(
        tj.model_name(SIZE), pretrained=str(exported[epoch])
    )
    want = strip_module(load(trained / f"epoch_{epoch}.pt")["state_dict"])
    got = model.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert same_bits(got[k], v), k


def test_training_resumes_from_the_export(tmp_path: Path, exported: dict[int, Path]) -> None:
    resume_from = exported[1]
    _proc, run_dir = tj.run_open_clip_train(
        tmp_path, epochs=EPOCHS, size=SIZE, n_images=N_IMAGES, val_samples=0, name="resumed",
        extra_args=["--resume", str(resume_from)],
    )  # fmt: skip  # raises TrainingRunError on a non-zero exit or a missing last checkpoint
    log = (run_dir / "out.log").read_text(errors="replace")
    assert f"=> resuming checkpoint '{resume_from}' (epoch 1)" in log, log[-3000:]
    ckpts = run_dir / "checkpoints"
    # Training started at epoch 2: no epoch 1 was written, epoch 2 was.
    assert not (ckpts / "epoch_1.pt").exists()
    resumed = load(ckpts / "epoch_2.pt")
    assert resumed["epoch"] == 2
    assert list(resumed["state_dict"]) == list(load(resume_from)["state_dict"])


@pytest.mark.usefixtures("registered_models")
@pytest.mark.parametrize("epoch", range(1, EPOCHS + 1))
def test_export_safetensors_is_the_state_dict(epoch: int, store: Path, trained: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    target = tmp_path / f"epoch_{epoch}.safetensors"
    rc, out = ckpt("export", f"{RUN}@epoch={epoch}", "--store", str(store), "--format", "safetensors",
                   "-O", str(target))  # fmt: skip
    assert rc == 0, out
    want = load(trained / f"epoch_{epoch}.pt")["state_dict"]
    got = load_file(str(target))
    assert set(got) == set(want)  # safetensors files keep their own (sorted) order
    for k, v in want.items():
        assert same_bits(got[k], v), k
    with safe_open(str(target), framework="pt") as f:
        assert (f.metadata() or {}).get("epoch") == str(epoch)
    # OpenCLIP reads the safetensors export too.
    model = open_clip.create_model(tj.model_name(SIZE), pretrained=str(target))
    sd = model.state_dict()
    for k, v in strip_module(want).items():
        assert same_bits(sd[k], v), k
