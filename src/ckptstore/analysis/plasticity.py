"""Loss of plasticity: dormant units, falling rank and growing weights through a run.

* **τ-dormant units** (Sokar et al. 2023, "The dormant neuron phenomenon"): for a layer with H units and activations
  h over the probe set, unit i's score is s_i = E|h_i| / ((1/H) Σ_k E|h_k|) (the expectation over every probe
  input and token); the unit is dormant when s_i ≤ τ. With τ = 0 only units that never activate count. For an
  OpenCLIP model the layers are the hidden units of every transformer block's MLP (the output of ``mlp.gelu``, or
  of its activation module), in both towers: images of the probe through the vision tower, the probe's prompts
  through the text tower.
* **Stable rank** ‖W‖_F² / σ_max² and **effective rank** exp(H(σ/Σσ)) (Roy & Vetterli) of every weight matrix over
  time (a conv kernel reshaped to out × rest), as ``ckpt analyze weights`` computes them;
* **Weight magnitude**: ‖W_t‖, mean |W_t| and the growth ‖W_t‖ / ‖W_0‖.

The weight answers are one independent job per tensor (:func:`tensor_plasticity`; one tensor through every
checkpoint at a time, on Dask with :mod:`ckptstore.analysis.distributed`); dormant units need the model, one
checkpoint at a time (docs/analysis-averages.md, "Plasticity").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis.trajectory import Trajectory, TrajectoryError
from ckptstore.analysis.weights import _spectral_summary

if TYPE_CHECKING:
    from torch import nn

    from ckptstore.analysis.probes import ProbeSet

DEFAULT_TAU = 0.025


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# ------------------------------------------------------------------------------------------- weights
def tensor_plasticity(traj: Trajectory, name: str, spectral: bool = True) -> dict[str, Any]:
    """Norm, mean |w|, growth and (matrices) stable / effective rank of one tensor through the run."""
    norms: list[float] = []
    mean_abs: list[float | None] = []
    stable: list[float | None] = []
    eff: list[float | None] = []
    matrix = False
    for x in traj.iter_tensor(name):
        x64 = x.astype(np.float64).reshape(-1)
        norms.append(float(np.sqrt(x64 @ x64)))
        mean_abs.append(_num(float(np.abs(x64).mean())) if x64.size else None)
        matrix = x.ndim >= 2 and min(x.shape[0], x64.size // max(x.shape[0], 1)) >= 2
        if spectral and matrix and np.isfinite(x64).all():
            _, sr, er = _spectral_summary(x)
            stable.append(_num(sr))
            eff.append(_num(er))
        elif spectral and matrix:
            stable.append(None)
            eff.append(None)
    out: dict[str, Any] = {
        "norm": [_num(v) for v in norms],
        "mean_abs": mean_abs,
        "growth": [_num(v / norms[0]) if norms[0] > 0 else None for v in norms],
    }
    if spectral and matrix:
        out["stable_rank"], out["effective_rank"] = stable, eff
    return out


# ------------------------------------------------------------------------------------------- dormant units
def dormant_scores(acts: np.ndarray) -> np.ndarray:
    """Sokar et al.'s per-unit score from the units' mean absolute activations E|h_i|."""
    acts = np.asarray(acts, dtype=np.float64)
    mean = acts.mean() if acts.size else 0.0
    return acts / mean if mean > 0 else np.zeros_like(acts)


class ActivationMeter:
    """Forward hooks that accumulate Σ|h| per unit (the last dimension) and the count of rows, per layer."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise TrajectoryError(f"the model has no module {missing[0]!r}", hint="name modules of the model")
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = dict.fromkeys(layers, 0)
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in layers]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            a = t.detach().double().abs().reshape(-1, t.shape[-1])
            s = a.sum(dim=0).numpy()
            self.sums[name] = self.sums[name] + s if name in self.sums else s
            self.rows[name] += a.shape[0]

        return hook

    def mean_abs(self) -> dict[str, np.ndarray]:
        return {n: self.sums[n] / self.rows[n] for n in self.sums}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def dormant_units(
    model: nn.Module, run_inputs: Callable[[nn.Module], None], layers: Sequence[str], tau: float = DEFAULT_TAU
) -> dict[str, dict[str, Any]]:
    """Per layer: ``units``, ``count`` of τ-dormant units and their ``fraction``, from the activations that
    ``run_inputs(model)`` (forward passes over the probe) produces."""
    import torch

    meter = ActivationMeter(model, layers)
    try:
        with torch.inference_mode():
            run_inputs(model)
    finally:
        meter.remove()
    out = {}
    for name, acts in meter.mean_abs().items():
        dormant = int(np.count_nonzero(dormant_scores(acts) <= tau))
        out[name] = {"units": int(acts.size), "count": dormant, "fraction": dormant / acts.size}
    return out


def openclip_mlp_layers(model: nn.Module) -> list[str]:
    """The hidden activation module of every transformer block's MLP (``...resblocks.N.mlp.gelu``)."""
    names = []
    for n, m in model.named_modules():
        parts = n.split(".")
        if len(parts) >= 2 and parts[-2] == "mlp" and not any(True for _ in m.children()) and not hasattr(m, "weight"):
            names.append(n)
    return names


@dataclass
class Plasticity:
    points: list[dict[str, Any]]
    tau: float | None
    dormant: dict[str, dict[str, Any]]  # layer -> {"units", "count": [...], "fraction": [...]}
    weights: dict[str, dict[str, Any]]
    probe: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        total_units = sum(d["units"] for d in self.dormant.values())
        n = len(self.points)
        counts = [sum(d["count"][t] for d in self.dormant.values()) for t in range(n)] if self.dormant else []
        return {
            "points": self.points,
            "tau": self.tau,
            "probe": self.probe,
            "dormant": self.dormant,
            "dormant_total": {
                "units": total_units,
                "count": counts,
                "fraction": [c / total_units for c in counts] if total_units else [],
            },
            "weights": self.weights,
        }


def combine(
    traj: Trajectory,
    weights: Mapping[str, dict[str, Any]],
    dormant: Sequence[Mapping[str, dict[str, Any]]] = (),
    tau: float | None = None,
    probe: dict[str, Any] | None = None,
) -> Plasticity:
    layers: dict[str, dict[str, Any]] = {}
    for per in dormant:
        for name, d in per.items():
            rec = layers.setdefault(name, {"units": d["units"], "count": [], "fraction": []})
            rec["count"].append(d["count"])
            rec["fraction"].append(d["fraction"])
    ordered = {n: weights[n] for n in traj.weight_names()}
    return Plasticity([p.as_dict() for p in traj.points], tau, layers, ordered, probe)


def analyze_plasticity(
    traj: Trajectory,
    *,
    probe: ProbeSet | None = None,
    tau: float = DEFAULT_TAU,
    dormant: bool = True,
    spectral: bool = True,
    model_config: Any = None,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Plasticity:
    """Dormant units of an OpenCLIP run on ``probe`` (default: 200 digits), and the weight answers of every tensor.
    ``dormant=False`` skips the model (any trajectory then works)."""
    names = traj.weight_names()
    total = len(names) + (len(traj) if dormant else 0)
    weights = {}
    for done, name in enumerate(names, 1):
        weights[name] = tensor_plasticity(traj, name, spectral)
        if progress is not None:
            progress(done, total)
    per_ckpt: list[dict[str, dict[str, Any]]] = []
    described = None
    if dormant:
        from ckptstore.analysis.probes import digits_probe
        from ckptstore.analysis.representations import OpenClipRunner

        probe = probe or digits_probe(200)
        described = probe.describe()
        runner = OpenClipRunner(traj, model_config=model_config)
        layers = openclip_mlp_layers(runner.model)
        if not layers:
            raise TrajectoryError("the model has no transformer MLP blocks to measure dormant units in")
        tokens = runner.tokens(probe.prompts() if probe.has_labels else list(probe.captions or ()))

        def run_inputs(model: nn.Module) -> None:
            runner.encode_images(probe, batch_size)
            runner.encode_texts(tokens, batch_size)

        for i in range(len(traj)):
            model = runner.load(i)
            per_ckpt.append(dormant_units(model, run_inputs, layers, tau))
            if progress is not None:
                progress(len(names) + i + 1, total)
    return combine(traj, weights, per_ckpt, tau if dormant else None, described)
