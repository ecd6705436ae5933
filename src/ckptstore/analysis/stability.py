"""Stability flags: the checkpoints where a run went wrong (or stopped moving), each with what, where and how sure.

:func:`analyze_stability` reads the recorded losses from the checkpoints' metadata and the per-module series of
:func:`~ckptstore.analysis.weights.analyze_weights` (computed here when not given), and raises a :class:`Flag` at the
checkpoint where each problem *first* appears:

=====================  ===========================================================================================
``loss_spike``         a training or eval loss far above the rolling median of the values before it (a robust
                       z-score: the noise is the MAD of the window's steps), or a non-finite loss
``nonfinite``          NaN/Inf values in any weight tensor
``norm_blowup``        a module's norm jumps by a large factor between two checkpoints, far beyond its own history
``update_spike``       a module's relative update ‖Δw‖/‖w‖ jumps far above its recent updates
``logit_scale_clamp``  OpenCLIP's ``logit_scale`` at its clamp, ln(100): the temperature can sharpen no further
``collapse``           the effective dimension of the embeddings (``representations``) or the effective rank of a
                       projection matrix falls to a fraction of its best (counted after the early compression
                       every run goes through), or to about one dimension
``frozen``             a module that does not move at all from some checkpoint on (dead, or deliberately locked)
=====================  ===========================================================================================

The thresholds (:class:`StabilityThresholds`) were tuned so that a normal run (warm-up then cosine decay: the real
20-epoch tiny OpenCLIP run, and synthetic runs with noisy decaying losses) raises no flag; docs/analysis-dynamics.md
explains each rule and its confidence levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ckptstore.analysis.trajectory import Point, Trajectory, TrajectoryError
from ckptstore.analysis.weights import Series, WeightDynamics, analyze_weights

__all__ = ["KINDS", "Flag", "StabilityReport", "StabilityThresholds", "analyze_stability", "loss_series"]

KINDS = (
    "loss_spike",
    "nonfinite",
    "norm_blowup",
    "update_spike",
    "logit_scale_clamp",
    "collapse",
    "frozen",
)
LN_100 = math.log(100.0)
_MAD_TO_SIGMA = 1.4826  # MAD × this estimates σ for normal data


@dataclass(frozen=True)
class StabilityThresholds:
    """When a flag is raised. ``z`` thresholds are robust z-scores: (x − median) / (1.4826 · MAD) of a window."""

    window: int = 5  # preceding checkpoints the rolling median / MAD looks at
    min_history: int = 3  # values needed before a spike can be judged
    loss_z: float = 6.0
    loss_rel_floor: float = 0.05  # the MAD scale is at least this fraction of the median (flat plateaus)
    norm_factor: float = 2.0  # norm_t / norm_{t-1} at least this ...
    norm_z: float = 6.0  # ... and its log this far above the module's own history
    norm_log_floor: float = 0.02  # scale floor of the log-ratio history (2 %)
    update_factor: float = 5.0  # rel_update_t / median of the window at least this ...
    update_z: float = 6.0  # ... and its log this far above the window
    update_log_floor: float = 0.1
    update_min: float = 1e-4  # relative updates below this are never a spike
    update_min_numel: int = 8  # modules with fewer parameters (scalars) update too erratically to judge
    logit_scale_max: float = LN_100
    logit_scale_tol: float = 0.01
    collapse_ratio: float = 0.5  # effective dimension / best since the first trough at most this ...
    collapse_rise: float = 0.1  # ... once the curve has risen this much above its first trough
    collapse_min: float = 1.25  # an effective dimension at most this is a collapse whenever it happens
    rank_tensors: tuple[str, ...] = ("visual.proj", "text_projection")  # name suffixes checked for rank collapse


@dataclass(frozen=True)
class Flag:
    """One problem: what kind, in what (a module, tensor or series), from which checkpoint, and how sure."""

    kind: str
    where: str
    index: int
    label: str
    what: str
    confidence: str  # "high" | "medium" | "low"
    score: float | None
    value: Any
    threshold: Any
    severity: str = "high"  # how bad if true: "high" for divergence, "low" for a frozen module
    last_index: int | None = None  # the last checkpoint of a run of consecutive flagged ones
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("score", "value", "threshold"):
            out[key] = _json_value(out[key])
        if not self.details:
            del out["details"]
        return out


def _json_value(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


@dataclass(frozen=True)
class StabilityReport:
    points: list[Point]
    checked: list[str]
    skipped: dict[str, str]
    flags: list[Flag]
    thresholds: StabilityThresholds

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [p.as_dict() for p in self.points],
            "checked": list(self.checked),
            "skipped": dict(self.skipped),
            "thresholds": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.thresholds).items()},
            "flags": [f.to_dict() for f in self.flags],
        }


# ---------------------------------------------------------------------------------------------- helpers
def _confidence(ratio: float, short_history: bool = False) -> str:
    """How far past its threshold a score is → how sure; a short history lowers it one step."""
    level = 2 if ratio >= 2.0 else 1 if ratio >= 1.3 else 0
    level -= 1 if short_history and level > 0 else 0
    return ("low", "medium", "high")[level]


def _over(x: float, threshold: float) -> float:
    """How many times its threshold a score is (a zero threshold is passed infinitely)."""
    return x / threshold if threshold > 0 else math.inf


def _robust(history: np.ndarray, floor: float) -> tuple[float, float]:
    med = float(np.median(history))
    mad = float(np.median(np.abs(history - med)))
    return med, max(_MAD_TO_SIGMA * mad, floor)


def _number(v: Any) -> float | None:
    if isinstance(v, Mapping) and set(v) == {"$float"}:  # a stored non-finite float (docs/metadata.md §2)
        try:
            return float(v["$float"])
        except (TypeError, ValueError):
            return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def loss_series(points: Sequence[Point]) -> dict[str, np.ndarray]:
    """The losses recorded in the points' metadata, one array per series (NaN where a checkpoint has none).

    ``loss`` is the training loss (``loss.avg``, else ``loss.last``, or a plain number); ``metrics.NAME`` every
    eval metric whose name contains ``loss``.
    """
    out: dict[str, np.ndarray] = {}
    t = len(points)

    def put(key: str, i: int, v: float | None) -> None:
        if v is not None:
            out.setdefault(key, np.full(t, np.nan))[i] = v

    for i, p in enumerate(points):
        loss = p.metadata.get("loss")
        if isinstance(loss, Mapping) and "$float" not in loss:
            v = _number(loss.get("avg"))
            put("loss", i, v if v is not None else _number(loss.get("last")))
        else:
            put("loss", i, _number(loss))
        metrics = p.metadata.get("metrics")
        if isinstance(metrics, Mapping):
            for name, mv in metrics.items():
                if "loss" in str(name).lower():
                    put(f"metrics.{name}", i, _number(mv))
    return out


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive indices grouped into (first, last) runs."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


@dataclass
class _Hit:
    index: int
    score: float | None
    value: Any
    what: str
    confidence: str


def _merge(kind: str, where: str, hits: list[_Hit], points: Sequence[Point], threshold: Any, **kw: Any) -> list[Flag]:
    """One flag per run of consecutive hits, at its first checkpoint, with the run's highest confidence."""
    by_index = {h.index: h for h in hits}
    flags = []
    order = ("low", "medium", "high")
    for first, last in _runs(sorted(by_index)):
        run = [by_index[i] for i in range(first, last + 1)]
        head = run[0]
        best = max(run, key=lambda h: order.index(h.confidence))
        what = head.what + (f" (through {points[last].label})" if last > first else "")
        flags.append(
            Flag(kind, where, first, points[first].label, what, best.confidence, head.score, head.value, threshold,
                 last_index=last if last > first else None, **kw)
        )  # fmt: skip
    return flags


# ---------------------------------------------------------------------------------------------- the checks
def _loss_spikes(points: Sequence[Point], th: StabilityThresholds) -> tuple[list[Flag], bool]:
    series = loss_series(points)
    flags: list[Flag] = []
    for key, values in series.items():
        hits: list[_Hit] = []
        seen: list[float] = []
        for i, x in enumerate(values):
            if np.isnan(x) and not _is_recorded_nan(points[i], key):
                continue
            if not math.isfinite(x):
                hits.append(_Hit(i, None, None, f"{key} is {x} at {points[i].label}", "high"))
                continue
            hist = np.array(seen[-th.window :])
            if len(hist) < th.min_history:
                seen.append(float(x))
                continue
            # The level is the window's median; the noise is read from the window's steps (MAD of successive
            # differences), not its spread, which a steep but smooth descent would inflate.
            med = float(np.median(hist))
            steps = np.diff(hist)
            noise = _MAD_TO_SIGMA * float(np.median(np.abs(steps - np.median(steps))))
            scale = max(noise, th.loss_rel_floor * abs(med), 1e-12)
            z = (x - med) / scale
            if z >= th.loss_z and x > hist.max():
                times = f"{x / med:.3g}x" if med > 0 else "above"
                what = (f"{key} jumped to {x:.4g} at {points[i].label}, {times} the median {med:.4g} of the "
                        f"{len(hist)} checkpoints before ({z:.1f} robust deviations)")  # fmt: skip
                conf = _confidence(_over(z, th.loss_z), len(hist) < th.window)
                if med > 0 and x >= 1.5 * med and len(hist) >= th.window:
                    conf = "high"  # half as much again as the recent level: no noise looks like that
                hits.append(_Hit(i, z, float(x), what, conf))
            else:  # a spike stays out of the baseline, so a loss that stays up stays flagged (one merged flag)
                seen.append(float(x))
        flags += _merge("loss_spike", key, hits, points, th.loss_z)
    return flags, bool(series)


def _is_recorded_nan(p: Point, key: str) -> bool:
    """Whether a NaN in a loss series was recorded (a diverged step) rather than missing."""
    if key == "loss":
        loss = p.metadata.get("loss")
        vals = [loss.get("avg"), loss.get("last")] if isinstance(loss, Mapping) and "$float" not in loss else [loss]
    else:
        metrics = p.metadata.get("metrics")
        vals = [metrics.get(key.removeprefix("metrics."))] if isinstance(metrics, Mapping) else []
    return any((n := _number(v)) is not None and math.isnan(n) for v in vals)


def _nonfinite(w: WeightDynamics, points: Sequence[Point]) -> list[Flag]:
    first: dict[int, list[str]] = {}
    counts: dict[int, int] = {}
    for name, t in w.tensors.items():
        bad = np.nonzero(t.nonfinite > 0)[0]
        if len(bad):
            i = int(bad[0])
            first.setdefault(i, []).append(name)
            counts[i] = counts.get(i, 0) + int(t.nonfinite[i])
    flags = []
    for i in sorted(first):
        names = first[i]
        where = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more tensors"
        what = (f"{counts[i]} NaN/Inf values in {len(names)} tensor{'s' if len(names) > 1 else ''} from "
                f"{points[i].label} on")  # fmt: skip
        flags.append(Flag("nonfinite", where, i, points[i].label, what, "high", float(counts[i]), counts[i], 0,
                          details={"tensors": names}))  # fmt: skip
    return flags


def _norm_blowups(name: str, s: Series, points: Sequence[Point], th: StabilityThresholds) -> list[Flag]:
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.log(s.norm[1:] / s.norm[:-1])  # g[i-1]: log growth into checkpoint i
    hits = []
    for i in range(1, len(s.norm)):
        hist = g[: i - 1][np.isfinite(g[: i - 1])][-th.window :]
        gi = g[i - 1]
        if not math.isfinite(gi) or len(hist) < th.min_history - 1:
            continue
        med, scale = _robust(hist, th.norm_log_floor)
        z = (gi - med) / scale
        ratio = math.exp(gi)
        if ratio >= th.norm_factor and z >= th.norm_z:
            before = math.exp(float(np.max(np.abs(hist))))
            what = (f"norm of {name} grew {ratio:.3g}x (from {s.norm[i - 1]:.4g} to {s.norm[i]:.4g}) into "
                    f"{points[i].label}; before, it changed by {before:.3g}x at most")  # fmt: skip
            conf = _confidence(min(_over(ratio, th.norm_factor), _over(z, th.norm_z)), len(hist) < th.window)
            hits.append(_Hit(i, z, ratio, what, conf))
    return _merge("norm_blowup", name, hits, points, th.norm_factor)


def _update_spikes(name: str, s: Series, points: Sequence[Point], th: StabilityThresholds) -> list[Flag]:
    u = s.rel_update
    if s.numel < th.update_min_numel:
        return []
    hits = []
    for i in range(1, len(u)):
        prior = u[1:i]
        hist = prior[np.isfinite(prior) & (prior > 0)][-th.window :]
        ui = u[i]
        if not (math.isfinite(ui) and ui >= th.update_min) or len(hist) < th.min_history:
            continue
        logs = np.log(hist)
        med, scale = _robust(logs, th.update_log_floor)
        z = (math.log(ui) - med) / scale
        factor = ui / math.exp(med)
        if factor >= th.update_factor and z >= th.update_z:
            what = (f"relative update of {name} into {points[i].label} is {ui:.3g}, {factor:.3g}x the median "
                    f"{math.exp(med):.3g} of the {len(hist)} updates before")  # fmt: skip
            conf = _confidence(min(_over(factor, th.update_factor), _over(z, th.update_z)), len(hist) < th.window)
            hits.append(_Hit(i, z, float(ui), what, conf))
    return _merge("update_spike", name, hits, points, th.update_factor)


def _logit_scale(w: WeightDynamics, points: Sequence[Point], th: StabilityThresholds) -> tuple[list[Flag], bool]:
    flags: list[Flag] = []
    found = False
    for name, t in w.tensors.items():
        if name.split(".")[-1] != "logit_scale" or t.value is None:
            continue
        found = True
        near = np.nonzero(t.value >= th.logit_scale_max - th.logit_scale_tol)[0]
        if len(near):
            i = int(near[0])
            v = float(t.value[i])
            at_clamp = v >= th.logit_scale_max - 1e-4
            what = (f"{name} reached {v:.4f} at {points[i].label} (clamp ln(100) = {th.logit_scale_max:.4f}): the "
                    f"temperature 1/{math.exp(v):.1f} can sharpen no further")  # fmt: skip
            flags.append(Flag("logit_scale_clamp", name, i, points[i].label, what, "high" if at_clamp else "medium",
                              v - th.logit_scale_max, v, th.logit_scale_max, severity="medium"))  # fmt: skip
    return flags, found


def _collapse(
    where: str, values: np.ndarray, points: Sequence[Point], th: StabilityThresholds, what_of: str, severity: str
) -> list[Flag]:
    """The first checkpoint where an effective dimension/rank falls to ``collapse_ratio`` of its best, or below
    ``collapse_min``.

    A normal run *starts* by compressing: from a random initialisation the embeddings' effective dimension falls
    for a while (the 20-epoch tiny run's text embeddings go 24.8 → 8.0 in four epochs) and then grows again. So the
    relative rule only starts once the curve has recovered from its first trough (risen ``collapse_rise`` above its
    lowest value); the best is counted from there. A collapse from the very start shows only in the absolute rule.
    """
    lowest, best, recovered = math.inf, -math.inf, False
    for i, v in enumerate(np.asarray(values, dtype=np.float64)):
        if not math.isfinite(v):
            continue
        hit = None
        if v <= th.collapse_min:
            hit = (f"{what_of} is {v:.3g} at {points[i].label}: about one dimension left (≤ {th.collapse_min:g})",
                   "medium", v, th.collapse_min)  # fmt: skip
        elif recovered and best > 0 and v <= th.collapse_ratio * best:
            ratio = v / best
            hit = (f"{what_of} fell to {v:.3g}, {ratio:.0%} of its best {best:.3g} before {points[i].label}",
                   "high" if ratio <= th.collapse_ratio / 2 else "medium", ratio, th.collapse_ratio)  # fmt: skip
        if hit is not None:
            what, conf, score, threshold = hit
            if severity == "low":  # a weight matrix's rank says less than the embeddings themselves
                conf = "low" if conf == "medium" else "medium"
            return [Flag("collapse", where, i, points[i].label, what, conf, score, v, threshold, severity=severity)]
        if recovered:
            best = max(best, v)
        else:
            lowest = min(lowest, v)
            if v >= (1 + th.collapse_rise) * lowest:
                recovered, best = True, v
    return []


def _frozen(w: WeightDynamics, points: Sequence[Point], clamped: Mapping[str, int]) -> list[Flag]:
    """Modules that stop moving; ``clamped`` modules (a logit_scale held at its clamp from that checkpoint) are
    explained already and left out."""
    t = len(points)
    if t < 2:
        return []
    stops: dict[str, int] = {}
    for name, s in w.modules.items():
        moved = np.nonzero(~(s.dist_prev[1:] == 0))[0]  # NaN counts as moving: non-finite is its own flag
        k = int(moved[-1]) + 1 if len(moved) else 0  # the last checkpoint that differs from the one before
        zero_updates = t - 1 - k
        if (k == 0 or zero_updates >= 2) and not k >= clamped.get(name, t):
            stops[name] = k
    if not stops:
        return []
    if len(stops) == len(w.modules) and len(set(stops.values())) == 1:
        k = next(iter(stops.values()))
        what = f"no weight changes from {points[k].label} on ({t - 1 - k} identical checkpoints follow)"
        return [Flag("frozen", "model", k, points[k].label, what, "high", 0.0, 0.0, 0.0, severity="low")]
    flags = []
    for name, k in stops.items():
        if k == 0:
            what = f"{name} never changes (frozen or dead: no gradient reaches it, or it is locked)"
        else:
            what = f"{name} stops changing after {points[k].label} ({t - 1 - k} identical checkpoints follow)"
        flags.append(Flag("frozen", name, k, points[k].label, what, "high", 0.0, 0.0, 0.0, severity="low"))
    return flags


# ---------------------------------------------------------------------------------------------- the analysis
def analyze_stability(
    traj: Trajectory,
    *,
    weights: WeightDynamics | None = None,
    representations: Mapping[str, Any] | Any | None = None,
    thresholds: StabilityThresholds | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StabilityReport:
    """Flags for loss spikes, non-finite weights, norm blow-ups, update spikes, a clamped logit_scale, collapse and
    frozen modules, each at the checkpoint where it first appears.

    ``weights`` is a finished :func:`analyze_weights` of the same trajectory (computed here when not given, with
    spectra of ``rank_tensors`` only and no PCA; the rank check needs those spectra). ``representations`` is the
    representation analysis (or its JSON); its ``effective_dim`` (``{"image": [T], "text": [T]}``) is checked for
    collapse.
    """
    th = thresholds or StabilityThresholds()
    points = list(traj.points)
    if weights is None:
        ranked = th.rank_tensors
        weights = analyze_weights(traj, spectral=lambda n: n.endswith(ranked), pca=False, progress=progress)
    elif len(weights.points) != len(points):
        raise TrajectoryError(f"weights cover {len(weights.points)} checkpoints, the trajectory {len(points)}")
    checked: list[str] = []
    skipped: dict[str, str] = {}
    flags: list[Flag] = []

    loss_flags, has_loss = _loss_spikes(points, th)
    if has_loss:
        checked.append("loss_spike")
        flags += loss_flags
    else:
        skipped["loss_spike"] = "no loss recorded in the checkpoints' metadata (loss, metrics.*loss*)"

    checked.append("nonfinite")
    flags += _nonfinite(weights, points)

    if len(points) >= th.min_history + 1:
        checked += ["norm_blowup", "update_spike"]
        for name, s in weights.modules.items():
            flags += _norm_blowups(name, s, points, th)
            flags += _update_spikes(name, s, points, th)
    else:
        why = f"needs at least {th.min_history + 1} checkpoints for a history, the run has {len(points)}"
        skipped["norm_blowup"] = skipped["update_spike"] = why

    clamp_flags, has_logit = _logit_scale(weights, points, th)
    if has_logit:
        checked.append("logit_scale_clamp")
        flags += clamp_flags
    else:
        skipped["logit_scale_clamp"] = "no logit_scale parameter"

    collapse_checked = []
    if representations is not None and not isinstance(representations, Mapping) and hasattr(representations, "to_dict"):
        representations = representations.to_dict()  # a RepresentationDynamics (or alike) instead of its JSON
    dims = (representations or {}).get("effective_dim")
    if isinstance(dims, Mapping):
        for tower, values in dims.items():
            if isinstance(values, Sequence) and len(values) == len(points):
                arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
                flags += _collapse(f"{tower} embeddings", arr, points, th, f"effective dimension of the {tower} "
                                   "embeddings", "high")  # fmt: skip
                collapse_checked.append(f"{tower} embeddings")
    for name, tdyn in weights.tensors.items():
        spec = tdyn.spectral
        if (
            spec is not None
            and any(name.endswith(x) for x in th.rank_tensors)
            and np.isfinite(spec.effective_rank).any()
        ):
            flags += _collapse(name, spec.effective_rank, points, th, f"effective rank of {name}", "low")
            collapse_checked.append(name)
    if collapse_checked:
        checked.append("collapse")
    else:
        skipped["collapse"] = (
            "no representations' effective_dim given, and no spectra of " + ", ".join(th.rank_tensors) + " in weights"
        )

    checked.append("frozen")
    per_module: dict[str, int] = {}
    for tdyn in weights.tensors.values():
        per_module[tdyn.module] = per_module.get(tdyn.module, 0) + 1
    clamped = {
        weights.tensors[f.where].module: f.index
        for f in clamp_flags
        if f.where in weights.tensors and per_module[weights.tensors[f.where].module] == 1
    }
    flags += _frozen(weights, points, clamped)

    order = {k: i for i, k in enumerate(KINDS)}
    flags.sort(key=lambda f: (f.index, order.get(f.kind, len(order)), f.where))
    return StabilityReport(points, checked, skipped, flags, th)
