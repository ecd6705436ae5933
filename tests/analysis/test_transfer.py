"""Transfer: a linear probe on frozen features, per checkpoint, on the demo run and through the generic path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from ckptstore.analysis.probes import digits_probe  # noqa: E402
from ckptstore.analysis.trajectory import FileTrajectory, MemoryTrajectory  # noqa: E402
from ckptstore.analysis.transfer import (  # noqa: E402
    TransferError,
    analyze_transfer,
    plot_transfer,
    split_indices,
)
from ckptstore.errors import CkptStoreError  # noqa: E402

CHANCE = 0.1  # ten balanced digit classes


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Any:
    return digits_probe(300, seed=1)


def test_openclip_run_transfers_well_above_chance(digits: Any) -> None:
    pytest.importorskip("open_clip")
    pytest.importorskip("open_clip_train")
    from ckptstore.demo import trajectory as tj

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    traj = FileTrajectory(sorted(ckpts.glob("epoch_*.pt")))
    calls: list[tuple[int, int]] = []
    res = analyze_transfer(traj, digits, progress=lambda d, t: calls.append((d, t)))
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert {"points", "dataset", "accuracy", "train_accuracy", "best"} <= set(d)
    assert d["dataset"] == {"name": "digits-300-s1", "n_train": 210, "n_test": 90, "classes": list(digits.class_names)}
    assert len(d["accuracy"]) == len(d["train_accuracy"]) == 2 and calls[-1] == (2, 2)
    assert all(a > 3 * CHANCE for a in d["accuracy"])
    assert d["best"]["index"] == int(np.argmax(d["accuracy"]))
    assert d["best"]["label"] == d["points"][d["best"]["index"]]["label"]
    assert d["best"]["accuracy"] == max(d["accuracy"])
    assert d["probe"]["features"] == "embedding" and d["probe"]["feature_dim"] == 128
    pre = analyze_transfer(FileTrajectory([ckpts / "epoch_2.pt"]), digits, features="pre-projection").to_dict()
    assert pre["probe"]["feature_dim"] == 192  # the vision width: before the projection to the 128-d embedding
    assert pre["accuracy"][0] > 3 * CHANCE


def _generic_states() -> tuple[Any, list[dict[str, Any]]]:
    nn = torch.nn

    def factory() -> Any:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU())

    torch.manual_seed(0)
    random_features = factory().state_dict()
    dead = {k: torch.zeros_like(v) for k, v in random_features.items()}  # every feature 0: nothing to learn from
    return factory, [dead, random_features]


def test_generic_module_path_and_best_checkpoint(digits: Any) -> None:
    factory, states = _generic_states()
    traj = MemoryTrajectory(states, labels=["dead", "random"])
    res = analyze_transfer(traj, digits, factory=factory, C=0.5, batch_size=128)
    d = res.to_dict()
    assert d["accuracy"][0] <= 2 * CHANCE  # constant features: the majority class at best
    assert d["accuracy"][1] > 0.7  # random ReLU features of digits separate well
    assert d["best"] == {"index": 1, "label": "random", "accuracy": d["accuracy"][1]}
    assert d["probe"] == {"features": "custom", "feature_dim": 64, "C": 0.5, "seed": 0}
    # A feature function and a transform are used when given.
    seen = []

    def feature_fn(model: Any, batch: Any) -> Any:
        seen.append(tuple(batch.shape))
        return model(batch)[:, :8]

    small = analyze_transfer(
        MemoryTrajectory(states[1:]),
        digits,
        factory=factory,
        feature_fn=feature_fn,
        transform=lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0),
    )
    assert small.feature_dim == 8 and seen[0] == (256, 3, 32, 32)


def test_split_is_stratified_and_fixed(digits: Any) -> None:
    train, test = split_indices(digits.labels, 0.3, seed=3)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(digits)
    assert np.bincount(digits.labels[test]).min() >= 8  # every class on the test side
    again = split_indices(digits.labels, 0.3, seed=3)
    np.testing.assert_array_equal(train, again[0])


def test_errors(digits: Any) -> None:
    factory, states = _generic_states()
    traj = MemoryTrajectory(states)
    no_labels = replace(digits, labels=None)
    with pytest.raises(TransferError, match="no labels"):
        analyze_transfer(traj, no_labels, factory=factory)
    with pytest.raises(TransferError, match="every class"):
        analyze_transfer(traj, digits.subset(range(12)), factory=factory)
    with pytest.raises(TransferError, match="test_fraction"):
        analyze_transfer(traj, digits, factory=factory, test_fraction=1.5)
    with pytest.raises(TransferError, match="C must be positive"):
        analyze_transfer(traj, digits, factory=factory, C=0)
    with pytest.raises(TransferError, match="do not fit"):
        analyze_transfer(traj, digits, factory=lambda: torch.nn.Linear(2, 2))
    assert issubclass(TransferError, CkptStoreError) and issubclass(TransferError, ValueError)


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    record = {
        "points": [{"index": i, "label": f"r@{i}", "step": 10 * i, "epoch": i} for i in range(3)],
        "dataset": {"name": "digits", "n_train": 7, "n_test": 3, "classes": ["a", "b"]},
        "accuracy": [0.5, None, 0.7],
        "train_accuracy": [0.6, 0.8, 0.9],
        "best": {"index": 2, "label": "r@2", "accuracy": 0.7},
    }
    out = plot_transfer(record, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
