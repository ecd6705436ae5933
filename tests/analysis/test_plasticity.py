"""Plasticity: τ-dormant counts match a hand count on a constructed model; ranks and growth on the real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptstore.analysis.plasticity import analyze_plasticity, dormant_units, tensor_plasticity  # noqa: E402
from ckptstore.analysis.trajectory import FileTrajectory, MemoryTrajectory  # noqa: E402


def _model() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0], [0, 0], [0, 0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.01]))  # unit 3 dead, unit 4 barely alive
    return net


X = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0], [2.0, 2.0]])


def test_dormant_counts_match_a_hand_count() -> None:
    net = _model()
    # by hand: relu(W x + b) per unit, mean over the 4 inputs
    h = np.maximum(X.numpy() @ net[0].weight.detach().numpy().T + net[0].bias.detach().numpy(), 0)
    mean = h.mean(axis=0)  # [1.5, 1.25, 2.5, 0, 0.01]
    assert np.allclose(mean, [1.5, 1.25, 2.5, 0.0, 0.01])
    score = mean / mean.mean()  # average 1.052: unit 4 scores 0.0095, unit 1 1.188
    for tau, want in ((0.0, 1), (0.005, 1), (0.01, 2), (0.9, 2), (1.2, 3)):
        assert int((score <= tau).sum()) == want
        got = dormant_units(net, lambda m: m(X), ["1"], tau)["1"]
        assert got == {"units": 5, "count": want, "fraction": want / 5}, tau


def test_weight_answers_by_hand() -> None:
    w0 = np.diag([3.0, 1.0, 0.0]).astype(np.float32)
    traj = MemoryTrajectory([{"w": w0, "b": np.array([1.0, -1.0])}, {"w": 2 * w0, "b": np.array([2.0, 2.0])}])
    w = tensor_plasticity(traj, "w")
    assert w["norm"] == pytest.approx([10**0.5, 2 * 10**0.5]) and w["growth"] == pytest.approx([1.0, 2.0])
    assert w["stable_rank"] == pytest.approx([10 / 9, 10 / 9], rel=1e-6)
    p = np.array([0.75, 0.25])
    assert w["effective_rank"] == pytest.approx([float(np.exp(-(p * np.log(p)).sum()))] * 2, rel=1e-6)
    b = tensor_plasticity(traj, "b")
    assert "stable_rank" not in b and b["mean_abs"] == [1.0, 2.0]
    d = analyze_plasticity(traj, dormant=False).to_dict()
    assert d["dormant"] == {} and d["tau"] is None and set(d["weights"]) == {"w", "b"}


@pytest.mark.slow
def test_real_run() -> None:
    pytest.importorskip("open_clip")
    from ckptstore.analysis.probes import digits_probe
    from ckptstore.analysis.weights import analyze_weights
    from ckptstore.demo import trajectory as tj

    ckpts: Path = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    traj = FileTrajectory([ckpts / "epoch_1.pt", ckpts / "epoch_2.pt"])
    d = analyze_plasticity(traj, probe=digits_probe(40), tau=0.1).to_dict()
    json.dumps(d, allow_nan=False)
    assert len(d["dormant"]) == 6
    assert d["dormant"]["visual.transformer.resblocks.0.mlp.gelu"]["units"] == 768
    assert d["dormant_total"]["units"] == 3 * 768 + 3 * 512 and len(d["dormant_total"]["count"]) == 2
    w = analyze_weights(traj, pca=False).to_dict()["tensors"]
    name = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert d["weights"][name]["stable_rank"] == w[name]["spectral"]["stable_rank"]
    assert d["weights"][name]["effective_rank"] == w[name]["spectral"]["effective_rank"]
