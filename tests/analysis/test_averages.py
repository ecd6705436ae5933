"""Averages of stored checkpoints: LAWA of identical checkpoints is the checkpoint, two states average by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ckptstore import open_store
from ckptstore.analysis.averages import average_checkpoints, cast_back, ema_weights
from ckptstore.errors import CkptStoreError


def _bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _state(rng: np.random.Generator) -> dict:
    return {
        "w": rng.standard_normal((7, 5)).astype(np.float32),
        "h": rng.standard_normal(9).astype(np.float16),
        "d": rng.standard_normal(3),
        "count": np.array(3, dtype=np.int64),
    }


def test_lawa_of_identical_checkpoints_is_bit_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    store = open_store(tmp_path / "s", create=True)
    st = _state(rng)
    for step in (1, 2, 3, 4):
        store.save("r", step, {"state_dict": st, "optimizer": {"lr": 0.1}}, metadata={"step": step * 10})
    info = average_checkpoints(store, "r", last=3)
    assert info.ref == "r-lawa3@4"
    got = store.load(info.ref)
    assert set(got) == {"state_dict"}  # the optimizer is not carried over
    for k, v in st.items():
        assert got["state_dict"][k].dtype == v.dtype and got["state_dict"][k].tobytes() == v.tobytes(), k
    meta = store.resolve(info.ref).metadata
    assert meta["average"]["refs"] == ["r@2", "r@3", "r@4"] and meta["average"]["kind"] == "uniform"
    assert meta["step"] == 40
    ema = store.load(average_checkpoints(store, "r", last=4, ema=0.9).ref)
    for k, v in st.items():
        assert ema["state_dict"][k].tobytes() == v.tobytes(), k


def test_average_of_two_states_matches_hand_computation(tmp_path: Path, rng: np.random.Generator) -> None:
    store = open_store(tmp_path / "s", create=True)
    a, b = _state(rng), _state(rng)
    b["count"] = np.array(7, dtype=np.int64)
    store.save("r", 1, {"model": a})
    store.save("r", 2, {"model": b})
    got = store.load(average_checkpoints(store, "r", refs=["r@1", "2"]).ref)["model"]
    for k in ("w", "h", "d"):
        want = ((a[k].astype(np.float64) + b[k].astype(np.float64)) / 2).astype(a[k].dtype)
        assert got[k].tobytes() == want.tobytes(), k
    assert int(got["count"]) == 7  # integers: the last checkpoint's value
    e = store.load(average_checkpoints(store, "r", last=2, ema=0.75).ref)["model"]
    want = (0.75 * a["w"].astype(np.float64) + 0.25 * b["w"].astype(np.float64)).astype(np.float32)
    assert e["w"].tobytes() == want.tobytes()
    assert ema_weights(3, 0.5) == (0.25, 0.25, 0.5)


def test_average_never_overwrites(tmp_path: Path, rng: np.random.Generator) -> None:
    store = open_store(tmp_path / "s", create=True)
    store.save("r", 1, {"model": _state(rng)})
    with pytest.raises(CkptStoreError):
        average_checkpoints(store, "r", last=1, name="r")
    average_checkpoints(store, "r", last=1)
    with pytest.raises(CkptStoreError, match="already exists"):
        average_checkpoints(store, "r", last=1)
    with pytest.raises(CkptStoreError):
        average_checkpoints(store, "r")


def test_bfloat16_cast_rounds_to_nearest_even() -> None:
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 0.0], dtype=np.float64)
    got = cast_back(x, "bfloat16").data
    assert got.tolist() == [0x3F80, 0x3F80, 0x3F82, int(_bf16(np.array([-2.5]))[0]), 0x0000]


def test_cli_average(tmp_path: Path, rng: np.random.Generator) -> None:
    import json
    import subprocess
    import sys

    store = open_store(tmp_path / "s", create=True)
    for step in (1, 2):
        store.save("r", step, {"model": _state(rng)})
    out = tmp_path / "avg.json"
    res = subprocess.run(
        [sys.executable, "-m", "ckptstore.cli", "average", "-s", str(tmp_path / "s"), "r", "--last", "2",
         "--json", "-O", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    blob = json.loads(res.stdout)
    assert blob["ref"] == "r-lawa2@2" and json.loads(out.read_text()) == blob
    assert blob["average"]["refs"] == ["r@1", "r@2"]


def test_analyze_averages_with_an_evaluator(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from ckptstore.analysis.averages import analyze_averages

    store = open_store(tmp_path / "s", create=True)
    target = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    for step, noise in enumerate((0.5, -0.3, 0.4, -0.2), 1):
        store.save("r", step, {"model": {"w": target + np.float32(noise)}})

    def evaluate(sd: object) -> dict[str, float]:
        w = sd["w"]  # type: ignore[index]
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
        return {"loss": float(((w.double() - torch.from_numpy(target).double()) ** 2).mean())}

    d = analyze_averages(store, "r", ks=(2, 4), ema=0.5, evaluate=evaluate)
    by = {c["name"]: c for c in d["candidates"]}
    assert list(by) == ["last", "lawa2", "lawa4", "ema0.5"]
    assert by["last"]["loss"] == pytest.approx(0.04, rel=1e-6)
    assert by["lawa2"]["loss"] == pytest.approx(0.01, rel=1e-5)  # mean noise (0.4 - 0.2) / 2 = 0.1
    assert by["lawa4"]["loss"] == pytest.approx(0.01, rel=1e-5)  # (0.5 - 0.3 + 0.4 - 0.2) / 4 = 0.1
    assert by["ema0.5"]["weights"] == [0.125, 0.125, 0.25, 0.5]
    assert by["ema0.5"]["loss"] == pytest.approx(0.025**2, rel=1e-4)  # 0.0625 - 0.0375 + 0.1 - 0.1 = 0.025
    assert d["best"] == {"loss": "ema0.5"}
    assert store.runs() == ["r"]  # nothing stored
