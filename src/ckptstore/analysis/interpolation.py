"""Linear mode connectivity: loss and zero-shot accuracy along the straight line between two checkpoints.

For checkpoints A and B and α in ``points`` evenly spaced values of [0, 1], the model θ(α) = (1 − α) θ_A + α θ_B
(float64, cast back to each tensor's dtype; non-floating tensors from A) is evaluated on a probe set. The **loss
barrier** is max over α of L(θ(α)) − [(1 − α) L(θ_A) + α L(θ_B)]: 0 when the path never rises above the chord
between the ends (linearly connected, Frankle et al. 2020), positive when a ridge separates them. The accuracy
barrier is the same with the accuracy's dip below its chord. For several checkpoints, every pair gives one path and
the barriers form a matrix (docs/analysis-averages.md, "Interpolation").

The default evaluator embeds an image probe with an OpenCLIP model (:class:`OpenClipEvaluator`): zero-shot top-1 /
top-5 accuracy and the zero-shot cross-entropy loss (logits = exp(logit_scale) · image embedding · class embeddings,
as open_clip's CLIP loss scales them). Any callable ``state_dict -> {"loss": ..., "top1": ...}`` can stand in for
it, for other models and losses. Evaluating needs whole models: two endpoint states and the blend are in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis.trajectory import Trajectory, TrajectoryError

if TYPE_CHECKING:
    import torch

    from ckptstore.analysis.probes import ProbeSet

Evaluator = Callable[[Mapping[str, Any]], Mapping[str, float]]


def blend(a: Mapping[str, Any], b: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """(1 − α)·a + α·b for every floating tensor, computed in float64 and cast back; other tensors from ``a``."""

    if set(a) != set(b):
        raise TrajectoryError("the two checkpoints hold different tensors", hint="interpolate checkpoints of one model")
    out = {}
    for k, x in a.items():
        y = b[k]
        if tuple(x.shape) != tuple(y.shape):
            raise TrajectoryError(
                f"tensor {k!r} has shape {tuple(x.shape)} in one checkpoint, {tuple(y.shape)} in the other"
            )
        if x.is_floating_point():
            out[k] = (
                ((1.0 - alpha) * x.double() + alpha * y.double()).to(x.dtype)
                if alpha not in (0.0, 1.0)
                else (x if alpha == 0.0 else y)
            )
        else:
            out[k] = x
    return out


def barrier(values: Sequence[float], alphas: Sequence[float], *, higher_is_worse: bool = True) -> float:
    """The largest rise of ``values`` above the chord between its ends (a dip below it, for accuracies); ≥ 0."""
    v = np.asarray(values, dtype=np.float64)
    al = np.asarray(alphas, dtype=np.float64)
    chord = v[0] + al * (v[-1] - v[0])
    gap = (v - chord) if higher_is_worse else (chord - v)
    return float(max(0.0, gap.max()))


class OpenClipEvaluator:
    """Zero-shot loss and accuracy of an OpenCLIP state dict on a labelled image probe."""

    def __init__(self, traj: Trajectory, probe: ProbeSet, *, model_config: Any = None, batch_size: int = 256) -> None:
        from ckptstore.analysis.representations import OpenClipRunner

        if not probe.has_labels:
            raise TrajectoryError(f"probe {probe.name!r} has no labels", hint="zero-shot evaluation needs labels")
        self.runner = OpenClipRunner(traj, model_config=model_config)
        self.probe = probe
        self.batch_size = batch_size

    def __call__(self, state: Mapping[str, Any]) -> dict[str, float]:
        import torch

        from ckptstore.analysis.representations import zero_shot_accuracy

        model = self.runner.model
        sd = dict(state)
        ls = getattr(model, "logit_scale", None)
        if isinstance(sd.get("logit_scale"), torch.Tensor) and isinstance(ls, torch.Tensor):
            sd["logit_scale"] = sd["logit_scale"].reshape(ls.shape)
        model.load_state_dict(sd, strict=True)
        img = self.runner.encode_images(self.probe, self.batch_size)
        cls = self.runner.zero_shot_classifier(self.probe.class_names, self.probe.templates)
        labels = np.asarray(self.probe.labels)
        scale = float(np.exp(float(model.logit_scale.detach().double().reshape(-1)[0])))
        logits = scale * (img.astype(np.float64) @ cls.astype(np.float64))
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = float(-logp[np.arange(len(labels)), labels].mean())
        return {"loss": loss, **zero_shot_accuracy(img, cls, labels)}


def _state(traj: Trajectory, index: int) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in traj.state_dict(index).items()}


@dataclass
class Interpolation:
    points: list[dict[str, Any]]
    alphas: list[float]
    paths: list[dict[str, Any]]  # one per pair: {"a", "b", "metrics": {name: [per alpha]}, "barrier": {...}}

    def matrix(self, metric: str = "loss") -> list[list[float | None]]:
        n = len(self.points)
        out: list[list[float | None]] = [[0.0 if i == j else None for j in range(n)] for i in range(n)]
        for p in self.paths:
            out[p["a"]][p["b"]] = out[p["b"]][p["a"]] = p["barrier"].get(metric)
        return out

    def to_dict(self) -> dict[str, Any]:
        metrics = sorted({m for p in self.paths for m in p["barrier"]})
        return {
            "points": self.points,
            "alphas": self.alphas,
            "paths": self.paths,
            "barrier_matrix": {m: self.matrix(m) for m in metrics},
        }


def analyze_interpolation(
    traj: Trajectory,
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    points: int = 11,
    evaluate: Evaluator | None = None,
    probe: ProbeSet | None = None,
    model_config: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> Interpolation:
    """Metrics along the line between checkpoint pairs of ``traj`` (default: every pair) and their barriers.

    ``evaluate`` maps a state dict to metrics (``loss`` counts as higher-is-worse, anything else as an accuracy);
    without it, :class:`OpenClipEvaluator` on ``probe`` (default: 200 digits)."""
    if points < 2:
        raise TrajectoryError(f"--points must be at least 2, got {points}")
    n = len(traj)
    if pairs is None:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        raise TrajectoryError("interpolation needs two checkpoints")
    if evaluate is None:
        from ckptstore.analysis.probes import digits_probe

        evaluate = OpenClipEvaluator(traj, probe or digits_probe(200), model_config=model_config)
    alphas = [float(a) for a in np.linspace(0.0, 1.0, points)]
    ends: dict[int, Mapping[str, float]] = {}
    paths = []
    total, done = len(pairs) * points, 0
    for a, b in pairs:
        sa, sb = _state(traj, a), _state(traj, b)
        rows: list[Mapping[str, float]] = []
        for al in alphas:
            if al == 0.0 and a in ends:
                rows.append(ends[a])
            elif al == 1.0 and b in ends:
                rows.append(ends[b])
            else:
                rows.append(dict(evaluate(blend(sa, sb, al))))
            done += 1
            if progress is not None:
                progress(done, total)
        ends[a], ends[b] = rows[0], rows[-1]
        del sa, sb
        metrics = {k: [float(r[k]) for r in rows] for k in rows[0]}
        bar = {k: barrier(v, alphas, higher_is_worse=(k == "loss")) for k, v in metrics.items()}
        paths.append({"a": a, "b": b, "labels": [traj.points[a].label, traj.points[b].label],
                      "metrics": metrics, "barrier": bar})  # fmt: skip
    return Interpolation([p.as_dict() for p in traj.points], alphas, paths)
