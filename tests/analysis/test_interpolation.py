"""Interpolation: a checkpoint with itself has barrier 0; a model and its hidden-unit permutation show the barrier
a direct torch computation gives; the OpenCLIP path runs on the real run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptstore.analysis.interpolation import analyze_interpolation, barrier, blend  # noqa: E402
from ckptstore.analysis.trajectory import FileTrajectory, MemoryTrajectory  # noqa: E402


def _mlp_states() -> tuple[dict[str, Any], dict[str, Any], torch.Tensor, torch.Tensor]:
    """A small MLP trained to fit its data, and the same network with its 16 hidden units permuted."""
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    a = {k: v.detach().clone() for k, v in net.state_dict().items()}
    perm = torch.randperm(16)
    b = {"0.weight": a["0.weight"][perm], "0.bias": a["0.bias"][perm], "2.weight": a["2.weight"][:, perm],
         "2.bias": a["2.bias"].clone()}  # fmt: skip
    return a, b, x, y


def _forward(sd: Any, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ sd["0.weight"].T + sd["0.bias"])
    return h @ sd["2.weight"].T + sd["2.bias"]


def _evaluator(x: torch.Tensor, y: torch.Tensor) -> Any:
    def evaluate(sd: Any) -> dict[str, float]:
        out = _forward(sd, x)
        return {
            "loss": float(torch.nn.functional.cross_entropy(out, y)),
            "top1": float((out.argmax(1) == y).float().mean()),
        }

    return evaluate


def test_self_pair_has_no_barrier() -> None:
    a, _, x, y = _mlp_states()
    traj = MemoryTrajectory([a, a])
    res = analyze_interpolation(traj, points=11, evaluate=_evaluator(x, y)).to_dict()
    (path,) = res["paths"]
    assert path["barrier"] == {"loss": 0.0, "top1": 0.0}
    assert len(set(path["metrics"]["loss"])) == 1
    assert res["barrier_matrix"]["loss"] == [[0.0, 0.0], [0.0, 0.0]]
    json.dumps(res, allow_nan=False)


def test_permuted_pair_shows_the_barrier_torch_computes() -> None:
    a, b, x, y = _mlp_states()
    assert torch.allclose(_forward(a, x), _forward(b, x), atol=1e-5)  # the same function
    traj = MemoryTrajectory([a, b, a])
    res = analyze_interpolation(traj, [(0, 1), (0, 2)], points=11, evaluate=_evaluator(x, y))
    d = res.to_dict()
    alphas = torch.linspace(0, 1, 11, dtype=torch.float64)
    direct = []
    for al in alphas:
        sd = {k: ((1 - al) * a[k].double() + al * b[k].double()).float() for k in a}
        direct.append(float(torch.nn.functional.cross_entropy(_forward(sd, x), y)))
    want = max(0.0, max(direct[i] - (direct[0] + float(alphas[i]) * (direct[-1] - direct[0])) for i in range(11)))
    got = d["paths"][0]["barrier"]["loss"]
    assert want > 0.1 and abs(got - want) <= 1e-6 * want
    assert np.allclose(d["paths"][0]["metrics"]["loss"], direct, rtol=1e-6)
    assert d["paths"][1]["barrier"]["loss"] == 0.0
    m = d["barrier_matrix"]["loss"]
    assert m[0][1] == m[1][0] == got and m[1][2] is None


def test_barrier_and_blend() -> None:
    assert barrier([1.0, 3.0, 1.0], [0, 0.5, 1]) == 2.0
    assert barrier([1.0, 0.5, 1.0], [0, 0.5, 1], higher_is_worse=False) == 0.5
    assert barrier([1.0, 0.5, 0.0], [0, 0.5, 1]) == 0.0
    sd = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
    out = blend(sd, {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16), "n": torch.tensor([5])}, 0.5)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 3.0] and out["n"].tolist() == [3]


@pytest.mark.slow
def test_openclip_path_on_real_run() -> None:
    pytest.importorskip("open_clip")
    from ckptstore.analysis.probes import digits_probe
    from ckptstore.demo import trajectory as tj

    ckpts: Path = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    traj = FileTrajectory([ckpts / "epoch_1.pt", ckpts / "epoch_2.pt", ckpts / "epoch_2.pt"])
    d = analyze_interpolation(traj, [(0, 1), (1, 2)], points=3, probe=digits_probe(60)).to_dict()
    p01, p12 = d["paths"]
    assert set(p01["metrics"]) == {"loss", "top1", "top5"}
    assert all(np.isfinite(v) for v in p01["metrics"]["loss"]) and p01["barrier"]["loss"] >= 0
    assert p12["barrier"] == {"loss": 0.0, "top1": 0.0, "top5": 0.0}
    assert p01["metrics"]["loss"][-1] == p12["metrics"]["loss"][0]
