"""The report's data: inputs checked and normalised, the run's points and axes, metadata curves, and the
JSON record (:func:`report_json`). No matplotlib, no HTML."""

from __future__ import annotations

import datetime as _dt
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis.report import landscape
from ckptstore.errors import CkptStoreError
from ckptstore.util import jsonable

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ckptstore.analysis.trajectory import Point, Trajectory


REPORT_FORMAT = "ckptstore.report"


REPORT_VERSION = 1


#: The analyses a report can hold, in page order after the metric curves.
SECTIONS = ("stability", "weights", "representations", "transfer")


_DEFAULT_REASONS = {
    "weights": "not computed (ckptstore.analysis.weights.analyze_weights)",
    "stability": "not computed (ckptstore.analysis.stability.analyze_stability)",
    "representations": "not computed (ckptstore.analysis.representations.analyze_representations)",
    "transfer": "not computed (ckptstore.analysis.transfer.analyze_transfer)",
}


class ReportError(CkptStoreError, ValueError):
    """An input to the report is not an analysis result, its ``to_dict()``, or ``None``."""


def _as_dict(name: str, result: Any) -> dict[str, Any] | None:
    """An analysis result (with ``to_dict()``) or its dict, as a dict; ``None`` stays ``None``."""
    if result is None:
        return None
    if isinstance(result, Mapping):
        return dict(result)
    to_dict = getattr(result, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    raise ReportError(
        f"{name}= is a {type(result).__name__}, not an analysis result or its to_dict()",
        hint=f"pass the result of the {name} analysis, its .to_dict(), or None",
    )


def _num(value: Any) -> float | None:
    """A number as float (NaN and infinities kept); ``{"$float": "nan"}`` tags decoded; anything else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping) and set(value) == {"$float"}:
        try:
            return float(value["$float"])
        except (TypeError, ValueError):
            return None
    return None


def _series(values: Any, n: int | None = None) -> np.ndarray:
    """A per-checkpoint list as a float array, ``None`` (and anything not a number) as NaN, padded to ``n``."""
    vals = list(values) if isinstance(values, Sequence) and not isinstance(values, str | bytes) else []
    arr = np.array([_num(v) if _num(v) is not None else np.nan for v in vals], dtype=np.float64)
    if n is not None and arr.size != n:
        arr = np.concatenate([arr[:n], np.full(max(0, n - arr.size), np.nan)])
    return arr


def _matrix(values: Any, n: int) -> np.ndarray | None:
    """A T×T list of lists as a float array (nulls NaN); ``None`` when it is not n×n."""
    if not isinstance(values, Sequence) or len(values) != n:
        return None
    rows = [_series(r, n) for r in values]
    if any(not isinstance(r, Sequence) or len(r) != n for r in values):
        return None
    return np.vstack(rows) if rows else None


def _has_data(arr: np.ndarray) -> bool:
    return bool(np.isfinite(arr).any())


def _fmt(value: Any, digits: int = 4) -> str:
    v = _num(value)
    if v is None:
        return "–"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _fmt_int(value: Any) -> str:
    v = _num(value)
    return "–" if v is None or not math.isfinite(v) else f"{int(v):,}"


def _pick(n: int, k: int) -> list[int]:
    """At most ``k`` indices of ``range(n)``, evenly spaced, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(float(i)) for i in np.linspace(0, n - 1, k)})


def _ticks(n: int, k: int) -> list[int]:
    """Tick positions for ``n`` checkpoints: every s-th one so that at most ``k`` show, and the last."""
    stride = max(1, math.ceil(n / k))
    out = list(range(0, n, stride))
    if out and out[-1] != n - 1:
        if n - 1 - out[-1] < stride / 2 and len(out) > 1:
            out.pop()
        out.append(n - 1)
    return out


def _map(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (records may hold ``null`` where a section would be)."""
    return value if isinstance(value, Mapping) else {}


def _at(axis: _Axis, index: int | None) -> str:
    """`` at e3`` (dimmed HTML) naming a checkpoint, or nothing."""
    if index is None or not 0 <= index < len(axis.points):
        return ""
    return f" <span class=dim>at {_esc(_short(axis.points[index]))}</span>"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class _Run:
    """What the page says about the run itself: its checkpoints and their metadata."""

    name: str
    points: list[dict[str, Any]]
    metadata: list[Mapping[str, Any]]
    model: str | None

    @property
    def n(self) -> int:
        return len(self.points)


def _run_of(traj: Trajectory | Sequence[Point], title: str | None) -> _Run:
    pts: list[Any] = list(traj.points) if hasattr(traj, "points") else list(traj)
    points: list[dict[str, Any]] = []
    metas: list[Mapping[str, Any]] = []
    for i, p in enumerate(pts):
        if isinstance(p, Mapping):
            d = {
                "index": p.get("index", i),
                "label": p.get("label", f"#{i}"),
                "step": p.get("step"),
                "epoch": p.get("epoch"),
            }
            meta = p.get("metadata") or {}
        else:
            d, meta = p.as_dict(), p.metadata
        points.append(d)
        metas.append(meta if isinstance(meta, Mapping) else {})
    name = getattr(traj, "run", None)
    if not name and getattr(traj, "paths", None):
        first = Path(traj.paths[0])  # type: ignore[union-attr]
        name = first.parent.parent.name if first.parent.name == "checkpoints" else first.parent.name
    model = None
    for meta in metas:
        hp = meta.get("hparams")
        m = meta.get("model") or (hp.get("model") if isinstance(hp, Mapping) else None)
        if isinstance(m, str) and m:
            model = m
            break
    return _Run(str(name or title or "trajectory"), points, metas, model)


def _section_points(run: _Run, data: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The checkpoints a section's per-checkpoint lists refer to: its own ``points``, else the run's."""
    pts = data.get("points") if data else None
    if isinstance(pts, list) and pts and all(isinstance(p, Mapping) for p in pts):
        return [dict(p) for p in pts]
    return run.points


def _short(p: Mapping[str, Any]) -> str:
    """A short tick label for one checkpoint: ``e3`` (epoch), else ``s1200`` (step), else ``#5``."""
    if isinstance(p.get("epoch"), int | float) and not isinstance(p.get("epoch"), bool):
        return f"e{p['epoch']:g}"
    if isinstance(p.get("step"), int) and not isinstance(p.get("step"), bool):
        return f"s{p['step']}"
    return f"#{p.get('index', '?')}"


@dataclass
class _Axis:
    """The x axis of per-checkpoint curves: training steps when every checkpoint has one in order, else the
    checkpoint's position."""

    x: np.ndarray
    label: str
    points: list[dict[str, Any]]

    @classmethod
    def of(cls, points: Sequence[Mapping[str, Any]]) -> _Axis:
        steps = [p.get("step") for p in points]
        if steps and all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            arr = np.array(steps, dtype=np.float64)
            if np.all(np.diff(arr) > 0):
                return cls(arr, "training step", [dict(p) for p in points])
        return cls(np.arange(len(points), dtype=np.float64), "checkpoint", [dict(p) for p in points])

    def epoch_ticks(self, ax: Axes) -> None:
        """Epochs as ticks along the top edge, when the checkpoints record them and the x axis is steps."""
        if self.label != "training step":
            return
        marks = [
            (x, p["epoch"])
            for x, p in zip(self.x, self.points, strict=True)
            if isinstance(p.get("epoch"), int | float) and not isinstance(p.get("epoch"), bool)
        ]
        if not marks:
            return
        keep = [marks[i] for i in _ticks(len(marks), 8)]
        top = ax.secondary_xaxis("top")
        top.set_xticks([float(x) for x, _ in keep], [f"{e:g}" for _, e in keep])
        top.tick_params(labelsize=7, length=2, colors="0.4")
        top.set_xlabel("epoch", fontsize=7, color="0.4")


def _metric_family(name: str) -> str:
    """Metrics that belong on one panel: losses together, recall@k of one direction together, ranks together."""
    low = name.lower()
    if "loss" in low:
        return "losses (eval)"
    m = re.search(r"^(.*?)[_/ -]?r@\d+$", name, flags=re.IGNORECASE)
    if m:  # the trainer's own eval (its validation data), not the report's probe set: say so
        return f"{m.group(1) or 'retrieval'} recall@k (training log)"
    if low.endswith("rank"):
        return "ranks"
    return name


def _curves(run: _Run) -> dict[str, Any]:
    """The metadata curves as plain lists (the JSON form): loss, lr per group, grad_norm, each eval metric."""
    n = run.n
    out: dict[str, Any] = {}
    loss_last: list[float | None] = [None] * n
    loss_avg: list[float | None] = [None] * n
    lrs: list[list[float | None]] = []
    grad: list[float | None] = [None] * n
    metrics: dict[str, list[float | None]] = {}
    for i, meta in enumerate(run.metadata):
        loss = meta.get("loss")
        if isinstance(loss, Mapping):
            loss_last[i], loss_avg[i] = _num(loss.get("last")), _num(loss.get("avg"))
        else:
            loss_last[i] = _num(loss)
        lr = meta.get("lr")
        groups = lr if isinstance(lr, list) else [lr] if _num(lr) is not None else []
        for g, v in enumerate(groups):
            while len(lrs) <= g:
                lrs.append([None] * n)
            lrs[g][i] = _num(v)
        grad[i] = _num(meta.get("grad_norm"))
        for k, v in _map(meta.get("metrics")).items():
            metrics.setdefault(str(k), [None] * n)[i] = _num(v)
    if any(v is not None for v in loss_last) or any(v is not None for v in loss_avg):
        out["loss"] = {"last": loss_last, "avg": loss_avg}
    if lrs:
        out["lr"] = lrs
    if any(v is not None for v in grad):
        out["grad_norm"] = grad
    out["metrics"] = {k: v for k, v in metrics.items() if any(x is not None for x in v)}
    return out


@dataclass
class _Inputs:
    run: _Run
    sections: dict[str, dict[str, Any] | None]
    skipped: dict[str, str]
    title: str
    generated: str


def _inputs(
    traj: Trajectory | Sequence[Point],
    weights: Any,
    stability: Any,
    representations: Any,
    transfer: Any,
    title: str | None,
    skipped: Mapping[str, str] | None,
    generated: _dt.datetime | None,
    extra: Mapping[str, Any] | None = None,
) -> _Inputs:
    run = _run_of(traj, title)
    if run.n == 0:
        raise ReportError("a report needs at least one checkpoint")
    sections = {
        "weights": _as_dict("weights", weights),
        "stability": _as_dict("stability", stability),
        "representations": _as_dict("representations", representations),
        "transfer": _as_dict("transfer", transfer),
    }
    reasons = {k: str((skipped or {}).get(k) or _DEFAULT_REASONS[k]) for k, v in sections.items() if v is None}
    for k in landscape.SECTIONS:  # averages, interpolation, optimizer, plasticity: present only when given
        if (extra or {}).get(k) is not None:
            sections[k] = _as_dict(k, extra[k])  # type: ignore[index]
    when = (generated or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    return _Inputs(
        run,
        sections,
        reasons,
        title or f"Training report: {run.name}",
        when.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    )


def report_json(
    traj: Trajectory | Sequence[Point],
    *,
    weights: Any = None,
    stability: Any = None,
    representations: Any = None,
    transfer: Any = None,
    title: str | None = None,
    skipped: Mapping[str, str] | None = None,
    generated: _dt.datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (``ckpt report --json``): the run's checkpoints, the
    metadata curves, each analysis's ``to_dict()`` (``None`` when not run) and why missing ones are missing.
    Non-finite numbers become ``null``."""
    from ckptstore import __version__

    inp = _inputs(traj, weights, stability, representations, transfer, title, skipped, generated, extra)
    return jsonable(
        {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "ckptstore": __version__,
            "generated": inp.generated,
            "title": inp.title,
            "run": inp.run.name,
            "model": inp.run.model,
            "points": inp.run.points,
            "curves": _curves(inp.run),
            **inp.sections,
            "skipped": inp.skipped,
        }
    )
