"""``ckpt analyze weights`` and ``ckpt analyze stability``: human and --json output, --out, options, one-line
errors, from a store run and from a folder of .pt files."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.cli.main import main

CkptRunner = Callable[..., tuple[int, str, str]]
T = 8


@pytest.fixture
def ckpt(capsys: pytest.CaptureFixture[str]) -> CkptRunner:
    def run(*argv: Any) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def states(t: int = T) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = {
        "enc.attn.weight": rng.normal(size=(12, 8)),
        "enc.attn.bias": np.zeros(12),
        "head.weight": rng.normal(size=(4, 12)),
    }
    out = []
    for _ in range(t):
        w = {n: v + 0.05 * rng.normal(size=v.shape) for n, v in w.items()}
        out.append({n: v.astype(np.float32) for n, v in w.items()})
    return out


def losses(spike_at: int | None = None) -> list[float]:
    out = [0.5 + 3 * math.exp(-k / 3) for k in range(T)]
    if spike_at is not None:
        out[spike_at] *= 3
    return out


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.store"
    s = ckptstore.create_store(path)
    for k, (st, loss) in enumerate(zip(states(), losses(), strict=True)):
        s.save("clean", k * 10, {"model": st}, {"step": k * 10, "loss": {"last": loss, "avg": loss, "window": 5}})
    for k, (st, loss) in enumerate(zip(states(), losses(spike_at=6), strict=True)):
        s.save("spiky", k * 10, {"model": st}, {"step": k * 10, "metrics": {"val_loss": loss}})
    return path


@pytest.fixture
def pt_folder(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    folder = tmp_path / "logs" / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for k, st in enumerate(states()):
        sd = {f"module.{n}": torch.from_numpy(v) for n, v in st.items()}  # as DDP saves them
        torch.save({"epoch": k + 1, "name": "run", "state_dict": sd}, folder / f"epoch_{k + 1}.pt")
    return folder


# ---------------------------------------------------------------------------------------------- weights
def test_weights_json_and_out(ckpt: CkptRunner, store: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "w.json"
    rc, out, err = ckpt("analyze", "weights", "clean", "-s", store, "--json", "--out", out_file)
    assert rc == 0, err
    blob = json.loads(out)
    assert blob == json.loads(out_file.read_text())
    assert [p["step"] for p in blob["points"]] == [10 * k for k in range(T)]
    assert set(blob["modules"]) == {"enc.attn", "head"}
    assert blob["modules"]["enc.attn"]["numel"] == 108
    assert set(blob["model"]) >= {"norm", "dist_init", "dist_prev", "path_length", "displacement", "straightness"}
    assert blob["pca"]["method"] == "exact" and len(blob["pca"]["coords"]) == T
    assert "spectral" in blob["tensors"]["head.weight"] and "spectral" not in blob["tensors"]["enc.attn.bias"]


def test_weights_human_output(ckpt: CkptRunner, store: Path) -> None:
    rc, out, _ = ckpt("analyze", "weights", "clean", "-s", store)
    assert rc == 0
    assert "enc.attn" in out and "head" in out and "‖W_T−W₀‖" in out and "relative" in out
    assert "path length" in out and "straightness" in out and "PCA of the trajectory (exact)" in out
    rc, out, _ = ckpt("analyze", "weights", "clean", "-s", store, "--top", "1")
    assert sum(line.startswith(("enc.attn", "head ")) for line in out.splitlines()) == 1


def test_weights_options(ckpt: CkptRunner, store: Path) -> None:
    rc, out, _ = ckpt(
        "analyze", "weights", "clean", "-s", store, "--json", "--no-spectral", "--no-pca", "--group-depth", "1"
    )
    assert rc == 0
    blob = json.loads(out)
    assert blob["pca"] is None and all("spectral" not in t for t in blob["tensors"].values())
    assert set(blob["modules"]) == {"enc", "head"}


def test_files_and_store_agree(ckpt: CkptRunner, store: Path, pt_folder: Path) -> None:
    rc, out, err = ckpt("analyze", "weights", pt_folder, "--json")
    assert rc == 0, err
    files = json.loads(out)
    assert [p["label"] for p in files["points"]] == [f"epoch_{k + 1}.pt" for k in range(T)]
    _, out, _ = ckpt("analyze", "weights", "clean", "-s", store, "--json")
    stored = json.loads(out)
    for blob in (files, stored):
        blob.pop("points")
    assert files == stored
    some = sorted(pt_folder.glob("epoch_*.pt"))[:2]
    rc, out, _ = ckpt("analyze", "weights", *some, "--json")
    assert rc == 0 and len(json.loads(out)["points"]) == 2


# ---------------------------------------------------------------------------------------------- stability
def test_stability_clean(ckpt: CkptRunner, store: Path) -> None:
    rc, out, _ = ckpt("analyze", "stability", "clean", "-s", store)
    assert rc == 0
    assert out.startswith(f"no flags in {T} checkpoints (checked: loss_spike, nonfinite, norm_blowup")
    assert "not checked: logit_scale_clamp: no logit_scale parameter" in out
    rc, out, _ = ckpt("analyze", "stability", "clean", "-s", store, "--json")
    blob = json.loads(out)
    assert blob["flags"] == [] and "loss_spike" in blob["checked"]


def test_stability_flags(ckpt: CkptRunner, store: Path, tmp_path: Path) -> None:
    rc, out, _ = ckpt("analyze", "stability", "spiky", "-s", store)
    assert rc == 0
    assert "1 stability flag in 8 checkpoints" in out and "loss_spike" in out and "spiky@60" in out
    out_file = tmp_path / "s.json"
    rc, out, _ = ckpt("analyze", "stability", "spiky", "-s", store, "--json", "--out", out_file)
    blob = json.loads(out)
    assert blob == json.loads(out_file.read_text())
    [flag] = blob["flags"]
    assert flag["kind"] == "loss_spike" and flag["where"] == "metrics.val_loss"
    assert flag["index"] == 6 and flag["label"] == "spiky@60"
    assert set(flag) >= {"where", "what", "confidence", "score", "value", "threshold"}


def test_stability_from_files(ckpt: CkptRunner, pt_folder: Path) -> None:
    rc, out, _ = ckpt("analyze", "stability", pt_folder, "--json")
    assert rc == 0
    blob = json.loads(out)
    assert blob["flags"] == [] and "loss_spike" in blob["skipped"]


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_one_line(ckpt: CkptRunner, store: Path, pt_folder: Path) -> None:
    rc, out, err = ckpt("analyze", "weights", "nope", "-s", store)
    assert rc != 0 and out == ""
    assert err.strip().count("\n") == 0 and "run 'nope' has no checkpoints" in err
    rc, _, err = ckpt("analyze", "stability", pt_folder / "epoch_1.pt", pt_folder / "missing.pt")
    assert rc != 0 and "no such checkpoint file" in err and err.strip().count("\n") == 0
