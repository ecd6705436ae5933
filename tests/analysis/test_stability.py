"""Stability flags (ckptstore.analysis.stability): clean runs raise none; each injected fault is flagged once, at
the checkpoint where it first appears."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.analysis.stability import (
    KINDS,
    LN_100,
    StabilityThresholds,
    analyze_stability,
    loss_series,
)
from ckptstore.analysis.trajectory import MemoryTrajectory, TrajectoryError
from ckptstore.analysis.weights import analyze_weights

T = 30


def realistic_run(seed: int = 0, t: int = T) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]]]:
    """A run shaped like a real one: linear warm-up over 5 checkpoints then cosine decay, AdamW-like updates
    (a persistent direction plus fresh noise, scaled by the learning rate, with weight decay), zero-initialised
    biases that grow from nothing, a logit_scale that legitimately grows, and noisy decaying train/eval losses."""
    rng = np.random.default_rng(seed)
    shapes = {
        "enc.0.attn.weight": (24, 16), "enc.0.attn.bias": (24,), "enc.0.mlp.weight": (32, 16),
        "enc.0.mlp.bias": (32,), "enc.1.attn.weight": (24, 16), "enc.1.mlp.weight": (32, 16),
        "ln.weight": (16,), "ln.bias": (16,), "visual.proj": (16, 8), "logit_scale": (),
    }  # fmt: skip
    w = {n: rng.normal(0, 0.2, s) for n, s in shapes.items()}
    for n in ("enc.0.attn.bias", "enc.0.mlp.bias", "ln.bias"):
        w[n] = np.zeros(shapes[n])
    w["ln.weight"] = np.ones(16)
    w["logit_scale"] = np.array(math.log(1 / 0.07))
    drift = {n: rng.normal(size=s) for n, s in shapes.items()}
    states, metas = [], []
    for k in range(t):
        lr = 5e-4 * (k + 1) / 5 if k < 5 else 5e-4 * 0.5 * (1 + math.cos(math.pi * (k - 5) / (t - 5)))
        for n, s in shapes.items():
            if n == "logit_scale":  # Adam moves a scalar by about lr per step, here steadily up (to ~4.4)
                w[n] = w[n] + lr * 200 * (1 + 0.3 * rng.normal())
            else:
                w[n] = w[n] * (1 - lr * 0.2) + lr * 40 * (0.5 * drift[n] + rng.normal(size=s))
        states.append({n: np.array(v, dtype=np.float32) for n, v in w.items()})
        loss = 0.6 + 3.5 * math.exp(-k / 6)
        metas.append({
            "step": 100 * (k + 1), "epoch": k + 1, "lr": [lr],
            "loss": {"last": loss * (1 + rng.normal(0, 0.04)), "avg": loss * (1 + rng.normal(0, 0.02)), "window": 50},
            "metrics": {"val_loss": (loss + 0.1) * (1 + rng.normal(0, 0.02)), "top1": 1 - loss / 4.2},
        })  # fmt: skip
    return states, metas


def representations(t: int = T) -> dict[str, Any]:
    return {"effective_dim": {"image": [20 + 10 * (1 - math.exp(-k / 5)) for k in range(t)],
                              "text": [15 + k * 0.3 for k in range(t)]}}  # fmt: skip


def kinds(report: Any) -> list[tuple[str, str, int]]:
    return [(f.kind, f.where, f.index) for f in report.flags]


def strict_json(d: dict[str, Any]) -> Any:
    return json.loads(json.dumps(d, allow_nan=False))


# ---------------------------------------------------------------------------------------------- clean runs
@pytest.mark.parametrize("seed", range(10))
def test_a_clean_realistic_run_raises_no_flags(seed: int) -> None:
    states, metas = realistic_run(seed)
    traj = MemoryTrajectory(states, metadata=metas)
    report = analyze_stability(traj, representations=representations())
    assert report.flags == [], [f.what for f in report.flags]
    assert report.checked == list(KINDS)  # everything could be checked
    d = strict_json(report.to_dict())
    assert d["flags"] == [] and d["skipped"] == {} and len(d["points"]) == T


def test_a_short_run_says_what_it_could_not_check() -> None:
    states, _ = realistic_run(t=3)
    report = analyze_stability(MemoryTrajectory(states))  # no metadata at all
    assert report.flags == []
    assert "loss_spike" in report.skipped and "norm_blowup" in report.skipped
    assert {"nonfinite", "logit_scale_clamp", "collapse", "frozen"} <= set(report.checked)


# ---------------------------------------------------------------------------------------------- injected faults
def test_nonfinite_tensor_is_flagged_where_it_first_appears() -> None:
    states, metas = realistic_run()
    for k in range(12, T):  # diverged: NaN from checkpoint 12 on
        states[k]["enc.1.mlp.weight"][3, 4] = np.nan
    states[20]["ln.bias"][0] = np.inf
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    got = [f for f in report.flags if f.kind == "nonfinite"]
    assert [(f.where, f.index, f.value, f.confidence) for f in got] == [
        ("enc.1.mlp.weight", 12, 1, "high"),
        ("ln.bias", 20, 1, "high"),
    ]
    assert got[0].details == {"tensors": ["enc.1.mlp.weight"]}
    assert all(f.kind == "nonfinite" for f in report.flags), kinds(report)  # NaN norms raise nothing else
    strict_json(report.to_dict())


def test_many_nonfinite_tensors_make_one_flag() -> None:
    states, metas = realistic_run()
    for k in range(25, T):
        for v in states[k].values():
            v[...] = np.nan
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert kinds(report) == [("nonfinite", "enc.0.attn.weight and 9 more tensors", 25)]


def test_norm_jump_in_one_module() -> None:
    states, metas = realistic_run()
    for k in range(15, T):
        states[k]["enc.0.mlp.weight"] = states[k]["enc.0.mlp.weight"] * 10
        states[k]["enc.0.mlp.bias"] = states[k]["enc.0.mlp.bias"] * 10
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    blowups = [(f.where, f.index) for f in report.flags if f.kind == "norm_blowup"]
    assert blowups == [("enc.0.mlp", 15)]
    flag = next(f for f in report.flags if f.kind == "norm_blowup")
    assert flag.value == pytest.approx(10, rel=0.05) and flag.confidence == "high" and flag.last_index is None
    assert "norm of enc.0.mlp grew 10.2x" in flag.what
    # the jump is also an update far beyond the module's recent ones; nothing else is flagged
    assert {(f.kind, f.where, f.index) for f in report.flags} == {("norm_blowup", "enc.0.mlp", 15),
                                                                   ("update_spike", "enc.0.mlp", 15)}  # fmt: skip


def test_update_spike_without_norm_change() -> None:
    states, metas = realistic_run()
    rng = np.random.default_rng(9)
    w = states[16]["enc.1.attn.weight"]
    kick = rng.normal(size=w.shape)
    kick *= np.linalg.norm(w) / np.linalg.norm(kick)
    for k in range(16, T):
        states[k]["enc.1.attn.weight"] = states[k]["enc.1.attn.weight"] + kick  # a sudden jump sideways
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert kinds(report) == [("update_spike", "enc.1.attn", 16)]


def test_loss_spike() -> None:
    states, metas = realistic_run()
    metas[18]["loss"]["avg"] *= 2.5
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert kinds(report) == [("loss_spike", "loss", 18)]
    f = report.flags[0]
    assert f.score is not None and f.score > f.threshold and f.confidence == "high"
    assert f.label == "#18" and "loss jumped to 1.914 at #18, 2.16x the median" in f.what


def test_consecutive_spikes_are_one_flag_and_eval_loss_counts() -> None:
    states, metas = realistic_run()
    for k in (18, 19):
        metas[k]["metrics"]["val_loss"] *= 3
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert kinds(report) == [("loss_spike", "metrics.val_loss", 18)]
    assert report.flags[0].last_index == 19 and "through #19" in report.flags[0].what


def test_nonfinite_loss_and_plain_number_losses() -> None:
    states, metas = realistic_run()
    plain = [{"loss": m["loss"]["avg"]} for m in metas]
    plain[7]["loss"] = {"$float": "nan"}  # as a store keeps it
    report = analyze_stability(MemoryTrajectory(states, metadata=plain))
    assert kinds(report) == [("loss_spike", "loss", 7)]
    assert report.flags[0].confidence == "high" and report.flags[0].score is None
    assert strict_json(report.to_dict())["flags"][0]["score"] is None
    assert list(loss_series(MemoryTrajectory(states, metadata=metas).points)) == ["loss", "metrics.val_loss"]


def test_logit_scale_growth_is_fine_but_the_clamp_is_flagged() -> None:
    states, metas = realistic_run()
    for k in range(T):
        states[k]["logit_scale"] = np.array(min(LN_100, 2.66 + 0.09 * k), np.float32)  # hits the clamp at 22
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert kinds(report) == [("logit_scale_clamp", "logit_scale", 22)]
    assert report.flags[0].confidence == "high"
    states[22]["logit_scale"] = np.array(LN_100 - 0.005, np.float32)  # within the tolerance, not at the clamp
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert [(f.index, f.confidence) for f in report.flags] == [(22, "medium")]


def test_representation_collapse() -> None:
    states, metas = realistic_run()
    reps = representations()
    reps["effective_dim"]["image"][22:] = [6.0] * (T - 22)  # from ~28 to 6: a fifth of the best
    report = analyze_stability(MemoryTrajectory(states, metadata=metas), representations=reps)
    assert kinds(report) == [("collapse", "image embeddings", 22)]
    assert report.flags[0].confidence == "high"


# The effective dimension of the 20-epoch tiny run's embeddings (200 digits; analyze_representations): the early
# compression from a random initialisation, then growth. A normal run, not a collapse.
REAL_IMAGE_DIM = [4.275, 3.655, 2.781, 2.121, 2.098, 2.605, 3.447, 4.164, 4.310, 4.686, 4.934, 5.147, 5.489, 5.713,
                  5.810, 5.862, 5.896, 5.925, 5.942, 5.946]  # fmt: skip
REAL_TEXT_DIM = [24.80, 21.29, 17.31, 12.26, 7.997, 9.263, 10.24, 10.40, 10.27, 10.32, 10.62, 11.04, 11.38, 11.60,
                 11.76, 11.85, 11.90, 11.93, 11.94, 11.94]  # fmt: skip


def test_the_early_compression_of_a_real_run_is_not_a_collapse() -> None:
    states, metas = realistic_run(t=20)
    reps = {"effective_dim": {"image": REAL_IMAGE_DIM, "text": REAL_TEXT_DIM}}
    traj = MemoryTrajectory(states, metadata=metas)
    assert analyze_stability(traj, representations=reps).flags == []
    # the same run collapsing later is flagged; so is a fall to one dimension at any time
    late = {"effective_dim": {"image": REAL_IMAGE_DIM, "text": REAL_TEXT_DIM[:12] + [4.0] * 8}}
    assert kinds(analyze_stability(traj, representations=late)) == [("collapse", "text embeddings", 12)]
    line = {"effective_dim": {"image": REAL_IMAGE_DIM[:3] + [1.1] * 17, "text": REAL_TEXT_DIM}}
    [flag] = analyze_stability(traj, representations=line).flags
    assert (flag.where, flag.index, flag.confidence) == ("image embeddings", 3, "medium")


def test_weight_rank_collapse_of_a_projection() -> None:
    states, metas = realistic_run()
    u = np.random.default_rng(3).normal(size=(16, 1))
    for k in range(20, T):
        states[k]["visual.proj"] = (u @ u.T @ states[k]["visual.proj"]).astype(np.float32)  # rank one
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    collapse = [f for f in report.flags if f.kind == "collapse"]
    assert [(f.where, f.index, f.severity) for f in collapse] == [("visual.proj", 20, "low")]


def test_frozen_modules() -> None:
    states, metas = realistic_run()
    for k in range(T):
        states[k]["enc.1.attn.weight"] = states[0]["enc.1.attn.weight"]  # never trained (e.g. locked)
    for k in range(26, T):
        states[k]["enc.0.mlp.weight"] = states[25]["enc.0.mlp.weight"]  # stops after #25
        states[k]["enc.0.mlp.bias"] = states[25]["enc.0.mlp.bias"]
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert kinds(report) == [("frozen", "enc.1.attn", 0), ("frozen", "enc.0.mlp", 25)]
    assert all(f.severity == "low" and f.confidence == "high" for f in report.flags)
    one = analyze_stability(MemoryTrajectory([states[0], states[0]]))
    assert kinds(one) == [("frozen", "model", 0)]


def test_given_weights_and_thresholds() -> None:
    states, metas = realistic_run()
    metas[18]["loss"]["avg"] *= 1.6
    traj = MemoryTrajectory(states, metadata=metas)
    weights = analyze_weights(traj, pca=False)
    assert kinds(analyze_stability(traj, weights=weights)) == [("loss_spike", "loss", 18)]
    lenient = StabilityThresholds(loss_z=1000)
    assert analyze_stability(traj, weights=weights, thresholds=lenient).flags == []
    with pytest.raises(TrajectoryError, match="checkpoints"):
        analyze_stability(MemoryTrajectory(states[:5]), weights=weights)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.15))
def test_noisy_decaying_losses_raise_nothing(seed: int, noise: float) -> None:
    """Losses that decay with up to 15 % multiplicative noise never look like a spike."""
    rng = np.random.default_rng(seed)
    metas = [{"loss": (0.5 + 4 * math.exp(-k / 7)) * (1 + noise * rng.uniform(-1, 1))} for k in range(T)]
    states = [{"w": np.full(3, float(k))} for k in range(T)]
    report = analyze_stability(MemoryTrajectory(states, metadata=metas))
    assert [f for f in report.flags if f.kind == "loss_spike"] == []


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_real_runs_raise_no_flags() -> None:
    """The shared 2-epoch tiny OpenCLIP run and the 20-epoch one (the same cached run tests/policy/test_thin_openclip.py
    trains): warm-up then cosine decay, normal runs. Twenty checkpoints give every check a history."""
    from ckptstore.demo import trajectory as tj

    pytest.importorskip("open_clip")
    from ckptstore.analysis.trajectory import open_trajectory

    short = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    long = tj.ensure_trajectory(epochs=20, size="tiny", n_images=128)
    for ckpts in (short, long):
        report = analyze_stability(open_trajectory(ckpts))
        assert report.flags == [], (ckpts, [f.what for f in report.flags])
        assert {"loss_spike", "nonfinite", "logit_scale_clamp", "collapse", "frozen"} <= set(report.checked)
    assert set(report.checked) >= {"norm_blowup", "update_spike"}, report.skipped  # the 20-epoch run checks all
