"""Key-checkpoint selection: choose ``n`` checkpoints that cover a run, and say why each one was chosen.

The algorithm (docs/policies.md walks through an example):

1. The first and the last checkpoint are always chosen (``n`` below 2 counts as 2).
2. Every checkpoint gets a point on the run's *progress curve*: ``u`` = fraction of the run's steps done,
   ``v`` = fraction of the weight path travelled (the cumulative L2 distance the weights moved, checkpoint to
   checkpoint; ``trajectory.path_length`` in the metadata). Without weight paths the curve is ``u`` alone.
3. The remaining ``n - 2`` picks are greedy. A *coverage* pick takes the checkpoint farthest (Euclidean, in
   ``(u, v)``) from every checkpoint chosen so far: greedy farthest-point sampling of the curve, which puts
   more checkpoints where the weights move fast (the early phase) without leaving the slow phase empty. A
   *change* pick takes the checkpoint whose metric value lies farthest from the straight line through its chosen
   neighbours (step on the x axis, the value's deviation as a fraction of the metric's range): the knees, jumps
   and plateaus of the metric curves — top-down piecewise-linear segmentation, as in Douglas–Peucker.
4. Picks alternate so that about ``metric_share`` of them are change picks (none when no metric is recorded, and
   a change pick below ``min_change`` of the range falls back to coverage). Ties go to the earlier step.

Everything is a pure function of the entries: the same history always gives the same choice and reasons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckptstore.policy.history import Entry, metric_names

__all__ = ["Choice", "phase_of", "select"]


@dataclass(frozen=True)
class Choice:
    """One chosen checkpoint. ``kind`` is first, last, coverage, change or all; ``phase`` early/middle/late."""

    step: int
    kind: str
    reason: str
    phase: str
    score: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"step": self.step, "kind": self.kind, "phase": self.phase, "reason": self.reason,
                "score": round(self.score, 6)}  # fmt: skip


def phase_of(u: float) -> str:
    """early / middle / late: which third of the run's steps ``u`` (0..1) falls in."""
    return "early" if u < 1 / 3 else "middle" if u < 2 / 3 else "late"


def _default_metrics(entries: Sequence[Entry]) -> list[str]:
    """Validation losses if recorded (``val_loss``, ``clip_val_loss``, ``eval_loss``), else any loss, else all."""
    names = metric_names(entries)
    losses = [m for m in names if "loss" in m.lower()]
    held_out = [m for m in losses if "val" in m.lower() or "eval" in m.lower() or "test" in m.lower()]
    return held_out or losses or names


def _keep_all(es: Sequence[Entry], u: Sequence[float], n: int) -> list[Choice]:
    """Every entry, when there are no more than ``n`` (at least first and last)."""
    m = len(es)
    out = []
    for i, e in enumerate(es):
        if i == 0:
            kind, why = "first", "first checkpoint"
        elif i == m - 1:
            kind, why = "last", "last checkpoint"
        else:
            kind, why = "all", f"every checkpoint is kept ({m} ≤ {max(2, n)})"
        out.append(Choice(e.step, kind, why, phase_of(u[i])))
    return out


def _path_fractions(es: Sequence[Entry]) -> list[float] | None:
    """Each entry's position along the weight path, 0 … 1; ``None`` unless every entry has a path length."""
    paths = [e.path for e in es]
    if all(p is not None for p in paths):
        p0, p1 = float(paths[0]), float(paths[-1])  # type: ignore[arg-type]
        if p1 > p0:
            return [(float(p) - p0) / (p1 - p0) for p in paths]  # type: ignore[arg-type]
    return None


def _curve_ranges(es: Sequence[Entry], names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """name -> (min, range) over the history, for the metrics with at least 3 values that change."""
    curves: dict[str, tuple[float, float]] = {}
    for name in names:
        vals = [x for e in es if (x := e.metric(name)) is not None]
        if len(vals) >= 3 and max(vals) > min(vals):
            curves[name] = (min(vals), max(vals) - min(vals))
    return curves


def select(
    entries: Sequence[Entry],
    n: int,
    *,
    metrics: Sequence[str] | None = None,
    metric_share: float = 0.4,
    min_change: float = 0.02,
) -> list[Choice]:
    """Choose ``n`` of ``entries`` (any order; returned in step order) covering the run; see the module docs.

    ``metrics`` names the metric curves whose change points count (default: the validation losses most
    checkpoints record, else their losses, else all their metrics).
    """
    es = sorted(entries, key=lambda e: e.step)
    m = len(es)
    if m == 0:
        return []
    s0, s1 = es[0].step, es[-1].step
    span = (s1 - s0) or 1
    u = [(e.step - s0) / span for e in es]
    if m <= max(2, n):
        return _keep_all(es, u, n)
    v = _path_fractions(es)

    def dist(i: int, j: int) -> float:
        return math.hypot(u[i] - u[j], v[i] - v[j]) if v is not None else abs(u[i] - u[j])

    curves = _curve_ranges(es, list(metrics) if metrics is not None else _default_metrics(es))

    chosen = [0, m - 1]
    picks: dict[int, Choice] = {
        0: Choice(es[0].step, "first", "first checkpoint", phase_of(0.0)),
        m - 1: Choice(es[-1].step, "last", "last checkpoint", phase_of(1.0)),
    }

    def neighbours(i: int) -> tuple[int, int]:
        left = max(c for c in chosen if c < i)
        right = min(c for c in chosen if c > i)
        return left, right

    def coverage(i: int) -> float:
        return min(dist(i, c) for c in chosen)

    def change(i: int) -> tuple[float, str, float, int | None, int | None]:
        """Largest deviation of entry i from the line through its chosen neighbours, over the metric curves."""
        best: tuple[float, str, float, int | None, int | None] = (0.0, "", 0.0, None, None)
        for name, (_lo, rng) in curves.items():
            val = es[i].metric(name)
            if val is None:
                continue
            have = [c for c in chosen if es[c].metric(name) is not None]
            left = max((c for c in have if c < i), default=None)
            right = min((c for c in have if c > i), default=None)
            if left is None and right is None:
                continue
            if left is not None and right is not None:
                a, b = es[left], es[right]
                ya, yb = a.metric(name), b.metric(name)
                assert ya is not None and yb is not None
                t = (es[i].step - a.step) / (b.step - a.step)
                line = ya + t * (yb - ya)
            else:
                only = left if left is not None else right
                assert only is not None
                line = es[only].metric(name)  # type: ignore[assignment]
            dev = abs(val - line) / rng
            if dev > best[0]:
                best = (dev, name, line, left, right)
        return best

    n_picks = max(2, n) - 2
    for k in range(n_picks):
        rest = [i for i in range(m) if i not in picks]
        if not rest:
            break
        want_change = bool(curves) and math.floor((k + 1) * metric_share) > math.floor(k * metric_share)
        cov_i = max(rest, key=lambda i: (coverage(i), -i))
        cov_score = coverage(cov_i)
        chg_i = max(rest, key=lambda i: (change(i)[0], -i))
        chg = change(chg_i)
        if (want_change and chg[0] >= min_change) or (cov_score <= 0 and chg[0] > 0):
            dev, name, line, li, ri = chg
            e = es[chg_i]
            val = e.metric(name)
            if li is not None and ri is not None:
                ref = f"the line from {es[li].label()} to {es[ri].label()} gives {line:.4g}"
            else:
                ref = f"the nearest chosen checkpoint has {line:.4g}"
            why = f"metric change point: {name} is {val:.4g} where {ref} (off by {dev:.0%} of its range)"
            choice = Choice(e.step, "change", why, phase_of(u[chg_i]), dev)
            pick = chg_i
        else:
            li, ri = neighbours(cov_i)
            du = u[ri] - u[li]
            what = f"{du:.0%} of the steps"
            if v is not None:
                what += f", {v[ri] - v[li]:.0%} of the weight path"
            gap = f"{es[li].label()} – {es[ri].label()}"
            why = f"coverage: farthest from the chosen checkpoints, in the gap {gap} ({what})"
            choice = Choice(es[cov_i].step, "coverage", why, phase_of(u[cov_i]), cov_score)
            pick = cov_i
        picks[pick] = choice
        chosen.append(pick)
        chosen.sort()
    return [picks[i] for i in sorted(picks)]
