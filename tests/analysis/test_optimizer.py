"""Optimizer diagnostics: relative updates and Adam's effective step match direct torch computations on a real
open_clip_train run, and a constructed AdamW run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptstore import create_store  # noqa: E402
from ckptstore.analysis.optimizer import analyze_optimizer, spikes_of  # noqa: E402
from ckptstore.analysis.trajectory import StoreTrajectory  # noqa: E402

REL = 1e-6


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    pytest.importorskip("open_clip")
    from ckptstore.demo import trajectory as tj
    from ckptstore.integrations.openclip import ingest

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    store = create_store(tmp_path_factory.mktemp("opt") / "ckpt.store")
    ingest(store, [ckpts], run="tiny")
    return ckpts, store


def _close(got: float | None, want: float) -> None:
    assert got is not None and abs(got - want) <= REL * abs(want), (got, want)


def _param_names_open_clip_train(ckpts: Path) -> list[str]:
    """Parameter id -> name as open_clip_train/main.py builds its two AdamW groups, from the model itself."""
    import open_clip

    from ckptstore.analysis.representations import build_openclip_model

    cfg = json.loads((ckpts.parent.parent.parent / "trajectory.json").read_text())["model_config"]
    model = build_openclip_model(cfg)
    assert isinstance(model, open_clip.CLIP)
    named = list(model.named_parameters())

    def exclude(n: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    return [n for n, p in named if exclude(n, p)] + [n for n, p in named if not exclude(n, p)]


@pytest.mark.slow
def test_matches_torch_on_real_run(real_run: tuple[Path, Any]) -> None:
    ckpts, store = real_run
    rep = analyze_optimizer(StoreTrajectory(store, "tiny"))
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["mapping"] == "open_clip_train groups"
    names = _param_names_open_clip_train(ckpts)
    c = [torch.load(ckpts / f"epoch_{e}.pt", weights_only=True, map_location="cpu") for e in (1, 2)]
    checked = 0
    for pid, name in enumerate(names):
        t = d["tensors"][name]
        assert t["param"] == pid
        a, b = (x["state_dict"][name].double() for x in c)
        if a.norm() > 0:
            _close(t["rel_update"][1], float((b - a).norm() / a.norm()))
        for i, ck in enumerate(c):
            group = next(g for g in ck["optimizer"]["param_groups"] if pid in g["params"])
            st = ck["optimizer"]["state"][pid]
            step = float(st["step"])
            vhat = st["exp_avg_sq"].double() / (1 - group["betas"][1] ** step)
            eff = group["lr"] / (vhat.sqrt() + group["eps"])
            _close(t["eff_step"]["mean"][i], float(eff.mean()))
            _close(t["eff_step"]["max"][i], float(eff.max()))
            _close(t["eff_step"]["min"][i], float(eff.min()))
            _close(t["eff_step"]["median"][i], float(np.median(eff.numpy())))
            assert t["v_near_zero"][i] == float((vhat.sqrt() <= group["eps"]).double().mean())
            assert t["step"][i] == step
        checked += 1
    assert checked == len(d["tensors"]) == 86
    da, db = (x["state_dict"] for x in c)
    num = sum(float(((db[n].double() - da[n].double()) ** 2).sum()) for n in names)
    den = sum(float((da[n].double() ** 2).sum()) for n in names)
    _close(d["model"]["rel_update"][1], (num / den) ** 0.5)


def test_constructed_adamw_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    store = create_store(tmp_path / "s")
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    snaps = []
    for step in range(1, 6):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        store.save("r", step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    d = analyze_optimizer(StoreTrajectory(store, "r")).to_dict()
    assert d["mapping"] == "state-dict order"
    for pid, name in enumerate(snaps[0]):
        t = d["tensors"][name]
        for i in range(1, 5):
            a, b = snaps[i - 1][name].double(), snaps[i][name].double()
            _close(t["rel_update"][i], float((b - a).norm() / a.norm()))
        assert t["step"] == [3.0, 6.0, 9.0, 12.0, 15.0]
        v = opt.state_dict()["state"][pid]["exp_avg_sq"].double() / (1 - 0.99**15)
        _close(t["eff_step"]["mean"][-1], float((1e-2 / (v.sqrt() + 1e-8)).mean()))


def test_spikes() -> None:
    rel = [None, 0.01, 0.011, 0.2, 0.009]
    got = spikes_of("w", rel, ["a", "b", "c", "d", "e"], 5.0)
    assert [(s["index"], s["label"]) for s in got] == [(3, "d")]
    assert spikes_of("w", [None, 0.1, 0.9], ["a", "b", "c"], 5.0) == []
