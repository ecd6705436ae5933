"""``ckpt analyze averages | interpolation | optimizer | plasticity`` end to end: --json, -O/--out, tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckptstore import create_store  # noqa: E402


def ckpt(*argv: str) -> str:
    res = subprocess.run([sys.executable, "-m", "ckptstore.cli", *argv], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_optimizer_and_plasticity_cli(adam_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    blob = json.loads(ckpt("analyze", "optimizer", "-s", str(adam_store), "r", "--json", "-O", str(out)))
    assert json.loads(out.read_text()) == blob and blob["mapping"] == "state-dict order"
    assert blob["tensors"]["0.weight"]["step"] == [1.0, 2.0, 3.0, 4.0]
    text = ckpt("analyze", "optimizer", "-s", str(adam_store), "r")
    assert "largest relative updates at r@4" in text and "model relative update" in text
    p = json.loads(ckpt("analyze", "plasticity", "-s", str(adam_store), "r", "--no-dormant", "--json"))
    assert p["weights"]["0.weight"]["stable_rank"][0] >= 1 and p["dormant"] == {}
    assert "stable rank" in ckpt("analyze", "plasticity", "-s", str(adam_store), "r", "--no-dormant")


def test_errors_are_one_line(adam_store: Path, tmp_path: Path) -> None:
    store = create_store(tmp_path / "t")
    store.save("noopt", 1, {"model": {"w": torch.ones(2, 2)}})
    res = subprocess.run([sys.executable, "-m", "ckptstore.cli", "analyze", "optimizer", "-s", str(tmp_path / "t"),
                          "noopt"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "holds no optimizer state" in res.stderr and "Traceback" not in res.stderr


def ckpt_here(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``ckpt`` in this process: the same parser and command, without a Python start-up importing open_clip."""
    from ckptstore.cli.main import main

    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.slow
def test_openclip_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("open_clip")
    from ckptstore.demo import trajectory as tj
    from ckptstore.integrations.openclip import ingest

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    s = tmp_path / "s"
    ingest(create_store(s), [ckpts], run="tiny")
    # One command as a real program (the model commands' imports in a fresh process), the others in this one.
    i = json.loads(ckpt("analyze", "interpolation", "-s", str(s), "tiny@1", "tiny@2", "--points", "3", "--n", "30",
                        "--json"))  # fmt: skip
    assert i["alphas"] == [0.0, 0.5, 1.0] and len(i["paths"]) == 1 and i["paths"][0]["barrier"]["loss"] >= 0
    a = json.loads(ckpt_here(capsys, "analyze", "averages", "-s", str(s), "tiny", "--k", "2", "--n", "30", "--json"))
    assert [c["name"] for c in a["candidates"]] == ["last", "lawa2", "ema0.9"]
    p = json.loads(ckpt_here(capsys, "analyze", "plasticity", "-s", str(s), "tiny", "--n", "30", "--json",
                             "--no-spectral"))  # fmt: skip
    assert len(p["dormant"]) == 6 and len(p["dormant_total"]["count"]) == 2


def test_dask_local_from_the_cli(adam_store: Path) -> None:
    pytest.importorskip("distributed")
    for cmd in (["optimizer"], ["plasticity", "--no-dormant"]):
        local = json.loads(ckpt("analyze", *cmd, "-s", str(adam_store), "r", "--json"))
        remote = json.loads(ckpt("analyze", *cmd, "-s", str(adam_store), "r", "--json", "--dask", "local"))
        assert remote == local, cmd
