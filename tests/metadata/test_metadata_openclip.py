"""OpenCLIP ingest of a real ``open_clip_train`` run folder carries the training state into the metadata: epoch,
step, samples seen, learning rates, hyper-parameters (``params.txt``), per-epoch eval metrics (``results.jsonl``)
and the epoch's training loss and wall time (``out.log``) — and all of it is queryable.

The run is the shared demo trajectory (2 epochs of the tiny model on 256 digits, validation on every epoch),
trained once into the default cache and reused by every test session.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

torch = importlib.import_module("torch")
importlib.import_module("open_clip_train")
importlib.import_module("sklearn")
importlib.import_module("pandas")

import ckptstore  # noqa: E402
from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.integrations import openclip  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS, N_IMAGES, BATCH = 2, 256, 64
STEPS_PER_EPOCH = N_IMAGES // BATCH
RUN = "tiny-csv-e2-s0"


def ckpt(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def run_dir() -> Path:
    ckpts = tj.ensure_trajectory(epochs=EPOCHS, size="tiny", n_images=N_IMAGES)
    return ckpts.parent


@pytest.fixture(scope="module")
def store(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oc") / "store"
    rc, out = ckpt("ingest", str(run_dir), "--store", str(path), "--init", "--json")
    assert rc == 0, out
    assert [Path(r["file"]).name for r in json.loads(out)] == ["epoch_1.pt", "epoch_2.pt"]
    return path


def test_the_run_folder_has_what_ingest_reads(run_dir: Path) -> None:
    assert run_dir.name == RUN
    for f in ("params.txt", "out.log", "checkpoints/results.jsonl", "checkpoints/epoch_1.pt", "checkpoints/epoch_2.pt"):
        assert (run_dir / f).is_file(), f
    rows = [json.loads(line) for line in (run_dir / "checkpoints/results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("clip_val_loss" in r for r in rows)


def test_ingest_carries_the_training_state(store: Path, run_dir: Path) -> None:
    results = {r["epoch"]: r for r in map(json.loads, (run_dir / "checkpoints/results.jsonl").read_text().splitlines())}
    log = (run_dir / "out.log").read_text()
    s = ckptstore.open_store(store)
    for epoch in range(1, EPOCHS + 1):
        m = s.resolve(f"{RUN}@epoch={epoch}")
        meta = m.metadata
        assert meta["schema"] == 1 and meta["epoch"] == epoch
        # open_clip_train 3.x writes no global_step/samples_seen: they come from the optimizer's update count
        raw = torch.load(run_dir / f"checkpoints/epoch_{epoch}.pt", map_location="cpu", weights_only=True)
        assert "global_step" not in raw and "samples_seen" not in raw
        assert meta["step"] == epoch * STEPS_PER_EPOCH == int(raw["optimizer"]["state"][0]["step"])
        assert meta["samples_seen"] == epoch * N_IMAGES
        assert meta["lr"] == [g["lr"] for g in raw["optimizer"]["param_groups"]] and len(meta["lr"]) == 2
        # hyper-parameters: the whole params.txt
        hp = meta["hparams"]
        assert hp == openclip.parse_params_txt(run_dir / "params.txt")
        assert (
            hp["batch_size"] == BATCH and hp["epochs"] == EPOCHS and hp["lr"] == 5e-4 and hp["model"] == meta["model"]
        )
        assert len(hp) > 50
        # the epoch's eval metrics, exactly as results.jsonl has them
        want = {k: v for k, v in results[epoch].items() if k not in ("epoch", "num_samples")}
        assert meta["metrics"] == want and "clip_val_loss" in want
        assert meta["eval_samples"] == results[epoch]["num_samples"]
        # the epoch's last logged training loss and the trainer's running mean
        lines = [ln for ln in log.splitlines() if f"Train Epoch: {epoch - 1} [" in ln]
        last, avg = re.search(r" Loss: (\S+) \((\S+)\)", lines[-1]).groups()  # type: ignore[union-attr]
        assert meta["loss"] == {"last": float(last), "avg": float(avg), "window": len(lines)}
        assert meta["wall_time"] > 0
        assert meta["hardware"] == {"world_size": 1, "accelerator": "cpu"}
        assert meta["source"]["kind"] == "open_clip_train"
    assert s.resolve(f"{RUN}@epoch=2").metadata["wall_time"] > s.resolve(f"{RUN}@epoch=1").metadata["wall_time"]


def test_ingested_metadata_is_queryable(store: Path, run_dir: Path) -> None:
    losses = {
        r["epoch"]: r["clip_val_loss"]
        for r in map(json.loads, (run_dir / "checkpoints/results.jsonl").read_text().splitlines())
    }
    best = min(losses, key=lambda e: losses[e])
    s = ckptstore.open_store(store)
    assert s.resolve(f"{RUN}@best:clip_val_loss").metadata["epoch"] == best

    columns = "ref,epoch,step,metadata.step,samples_seen,metrics.clip_val_loss"
    where = "metrics.clip_val_loss > 0 and epoch >= 2"
    rc, out = ckpt("ls", RUN, "--store", str(store), "--where", where, "--columns", columns, "--json")
    assert rc == 0
    # the store keys open_clip_train 3.x checkpoints by epoch (it records no global step); the training step
    # ingest derived is the metadata's
    assert json.loads(out) == [{"ref": f"{RUN}@2", "epoch": 2, "step": 2, "metadata.step": 8, "samples_seen": 512,
                                "metrics.clip_val_loss": losses[2]}]  # fmt: skip

    rc, out = ckpt("metrics", RUN, "--store", str(store), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["metadata.step"]) for r in rows] == [4, 8]
    assert [float(r["metrics.clip_val_loss"]) for r in rows] == [losses[1], losses[2]]
    assert "metrics.image_to_text_R@1" in rows[0] and "loss.last" in rows[0]

    rc, out = ckpt("show", f"{RUN}@latest", "--store", str(store))
    assert rc == 0 and "metrics (11):" in out and "hparams: " in out and "loss: last" in out


def test_checkpoint_metadata_without_run_files(tmp_path: Path, run_dir: Path) -> None:
    """A lone epoch_N.pt (no params.txt, no logs) still gets epoch, step and learning rates."""
    ck: dict[str, Any] = openclip.read_checkpoint(run_dir / "checkpoints/epoch_1.pt")
    lone = tmp_path / "epoch_1.pt"  # as if the file had been copied out of its run folder
    meta = openclip.checkpoint_metadata(ck, lone)
    assert meta["epoch"] == 1 and meta["step"] == STEPS_PER_EPOCH and len(meta["lr"]) == 2
    assert not {"hparams", "metrics", "samples_seen", "loss"} & set(meta)
    ck["global_step"], ck["samples_seen"] = 123, 4567  # newer open_clip_train records them: they win
    meta = openclip.checkpoint_metadata(ck, lone)
    assert meta["step"] == 123 and meta["samples_seen"] == 4567


def test_optimizer_steps_of_a_forged_optimizer_state_are_unknown_not_an_error() -> None:
    """Found by fuzzing (tests/corpus/pt/ok-optimizer-state-an-int.pt): ``"state": 3`` raised AttributeError."""
    import torch

    for opt in ({"state": 3}, {"state": [1, 2]}, {"state": {0: 5}}, {"state": {0: {"step": torch.zeros(3)}}}, 7):
        assert openclip._optimizer_steps(opt) is None
    assert openclip._optimizer_steps({"state": {0: {"step": torch.tensor(12.0)}, 1: {"step": 3}}}) == 12
