"""One self-contained HTML page about a training run: curves, weight dynamics, representations, transfer, flags.

:func:`build_report` works only from the analyses' ``to_dict()`` records (or the result objects themselves) and the
checkpoints' metadata, so a report can be rebuilt from saved ``--json`` output without reading a tensor. The page
is one file: plots are PNGs embedded as ``data:`` URIs, styles are inline, there is no script, and a
Content-Security-Policy forbids every fetch, so it renders the same offline, attached to an email or in CI.

Every section shows what it has; a missing analysis (or a missing part of one: no per-block CKA, no spectral
statistics) is named with the reason, so a reader can tell "not computed" from "nothing to see". Plots are drawn on
private matplotlib ``Figure`` objects with the Agg canvas inside ``matplotlib.rc_context``: the global backend and
rcParams of the calling program are left as they were. See docs/report.md.

>>> from ckptstore.analysis import open_trajectory
>>> from ckptstore.analysis.report import write_report
>>> traj = open_trajectory("run", store=store)  # doctest: +SKIP
>>> write_report(traj, "report.html", weights=analyze_weights(traj))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis import report_landscape as landscape
from ckptstore.errors import CkptStoreError, MissingDependencyError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ckptstore.analysis.trajectory import Point, Trajectory

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "SECTIONS", "ReportError", "build_report", "report_json", "write_report"]

REPORT_FORMAT = "ckptstore.report"
REPORT_VERSION = 1
#: The analyses a report can hold, in page order after the metric curves.
SECTIONS = ("stability", "weights", "representations", "transfer")
#: At most this many modules in the distance-from-init heat map (the ones that moved most, kept in model order).
MAX_HEATMAP_MODULES = 40
#: At most this many per-block CKA heat maps (evenly spaced through the blocks, first and last included).
MAX_BLOCK_MAPS = 8
#: At most this many metric panels in the curves figure.
MAX_METRIC_PANELS = 12
#: At most this many rows in the checkpoint table (first, last and evenly spaced between).
MAX_TABLE_ROWS = 60
_DPI = 144  # rendered at 1.5x the CSS size, so plots stay sharp on high-density screens
_CSS_DPI = 96

_RC: Any = {  # (matplotlib types the keys as a Literal of every rc name)
    "text.parse_math": False,  # metric and module names are data: "$x$" must print as typed, not as TeX
    "text.usetex": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.formatter.useoffset": False,  # "+9.794e1" above an axis reads as noise; print the values themselves
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}

_DEFAULT_REASONS = {
    "weights": "not computed (ckptstore.analysis.weights.analyze_weights)",
    "stability": "not computed (ckptstore.analysis.stability.analyze_stability)",
    "representations": "not computed (ckptstore.analysis.representations.analyze_representations)",
    "transfer": "not computed (ckptstore.analysis.transfer.analyze_transfer)",
}
_TITLES = {
    "curves": "Training curves",
    "stability": "Stability flags",
    "weights": "Weight dynamics",
    "representations": "Representations",
    "transfer": "Transfer",
    "checkpoints": "Checkpoints",
}


class ReportError(CkptStoreError, ValueError):
    """An input to the report is not an analysis result, its ``to_dict()``, or ``None``."""


# ------------------------------------------------------------------------------------------------ values


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


def _jsonable(value: Any) -> Any:
    """A copy that is valid JSON: non-finite floats become ``None``, tuples lists, numpy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


# ------------------------------------------------------------------------------------------------ the run


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


# ------------------------------------------------------------------------------------------------ figures


@dataclass
class _Figure:
    id: str
    alt: str
    caption: str  # HTML (already escaped)
    png: bytes

    def html(self) -> str:
        width, height = struct.unpack(">II", self.png[16:24])  # the PNG IHDR chunk
        w, h = round(width * _CSS_DPI / _DPI), round(height * _CSS_DPI / _DPI)
        data = base64.b64encode(self.png).decode("ascii")
        return (
            f'<figure id="{_esc(self.id)}"><img src="data:image/png;base64,{data}" alt="{_esc(self.alt)}" '
            f'width="{w}" height="{h}"><figcaption>{self.caption}</figcaption></figure>'
        )


def _new_figure(width: float, height: float) -> Figure:
    """A figure of its own on the Agg canvas: no pyplot, so no global backend or figure registry is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _grid(fig: Figure, n: int, cols: int) -> list[Axes]:
    rows = max(1, math.ceil(n / cols))
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _line(ax: Axes, axis: _Axis, y: np.ndarray, label: str | None = None, **kw: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    if axis.x.size <= 80:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 3)
    ax.plot(axis.x, y, label=label, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))  # steps are whole numbers


def _mark_best(ax: Axes, axis: _Axis, y: np.ndarray, index: int | None, color: str = "tab:red") -> None:
    """A star on the best checkpoint of a curve, with its value."""
    if index is None or not (0 <= index < y.size) or not math.isfinite(y[index]):
        return
    ax.plot(
        [axis.x[index]],
        [y[index]],
        marker="*",
        markersize=13,
        color=color,
        zorder=5,
        linestyle="none",
        label=f"best: {_fmt(y[index], 3)} at {_short(axis.points[index])}",
    )


def _checkpoint_ticks(ax: Axes, axis: _Axis, which: str = "x", limit: int = 12) -> None:
    """Checkpoint labels as categorical ticks of a heat map axis (thinned to ``limit``)."""
    idx = _ticks(len(axis.points), limit)
    labels = [_short(axis.points[i]) for i in idx]
    if which == "x":
        ax.set_xticks(idx, labels, rotation=45 if len(idx) > 8 else 0, ha="right" if len(idx) > 8 else "center")
    else:
        ax.set_yticks(idx, labels)


# ------------------------------------------------------------------------------------------------ curves


def _metric_family(name: str) -> str:
    """Metrics that belong on one panel: losses together, recall@k of one direction together, ranks together."""
    low = name.lower()
    if "loss" in low:
        return "losses (eval)"
    m = re.search(r"^(.*?)[_/ -]?r@\d+$", name, flags=re.IGNORECASE)
    if m:
        return f"{m.group(1) or 'retrieval'} recall@k"
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


def _curves_figure(run: _Run, curves: Mapping[str, Any]) -> tuple[_Figure | None, list[str]]:
    axis = _Axis.of(run.points)
    notes: list[str] = []
    panels: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    if "loss" in curves:
        series = [
            ("mean over window", _series(curves["loss"]["avg"], run.n)),
            ("last step", _series(curves["loss"]["last"], run.n)),
        ]
        panels.append(("training loss", [(lbl, s) for lbl, s in series if _has_data(s)]))
    if "lr" in curves:
        groups = [_series(g, run.n) for g in curves["lr"]]
        distinct: list[tuple[str, np.ndarray]] = []
        for g, s in enumerate(groups):
            if not any(np.array_equal(s, d, equal_nan=True) for _, d in distinct):
                distinct.append((f"group {g}", s))
        if len(distinct) == 1:
            distinct = [("all groups" if len(groups) > 1 else "lr", distinct[0][1])]
        panels.append(("learning rate", distinct))
    if "grad_norm" in curves:
        panels.append(("gradient norm", [("grad_norm", _series(curves["grad_norm"], run.n))]))
    families: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, vals in curves.get("metrics", {}).items():
        families.setdefault(_metric_family(name), []).append((name, _series(vals, run.n)))
    for fam, members in families.items():
        panels.append((fam, members))
    if not panels:
        return None, ["No loss, learning rate or eval metrics are recorded in the checkpoints' metadata."]
    if len(panels) > MAX_METRIC_PANELS:
        notes.append(f"Showing {MAX_METRIC_PANELS} of {len(panels)} metric panels; `--json` has every metric.")
        panels = panels[:MAX_METRIC_PANELS]
    cols = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(3.7 * cols, 2.7 * rows + 0.3)
    for k, (ax, (title, series)) in enumerate(zip(_grid(fig, len(panels), cols), panels, strict=True)):
        for lbl, s in series:
            _line(ax, axis, s, label=lbl, linewidth=1.4)
        ax.set_title(title, loc="left")
        ax.set_xlabel(axis.label)
        if title == "learning rate":
            from matplotlib.ticker import FuncFormatter

            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.1e}" if v else "0"))
        if len(series) > 1:
            ax.legend(loc="best")
        if k < cols:
            axis.epoch_ticks(ax)
    names = ", ".join(_esc(t) for t, _ in panels)
    cap = (
        f"Recorded in each checkpoint's metadata, against {_esc(axis.label)}"
        f"{' (epochs along the top)' if axis.label == 'training step' else ''}: {names}."
    )
    return _Figure(
        "fig-curves", f"Training curves of {run.name}: {', '.join(t for t, _ in panels)}", cap, _png(fig)
    ), notes


# ------------------------------------------------------------------------------------------------ weights


def _module_heatmap(w: Mapping[str, Any], axis: _Axis) -> tuple[_Figure | None, list[str]]:
    modules = w.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        return None, ["No per-module statistics in the weights analysis."]
    n = len(axis.points)
    names = list(modules)
    rows, relative = [], True
    for name in names:
        m = modules[name] if isinstance(modules[name], Mapping) else {}
        dist = _series(m.get("dist_init"), n)
        norm0 = _series(m.get("norm"), n)[0] if n else np.nan
        rows.append(dist / norm0 if math.isfinite(norm0) and norm0 > 0 else np.full(n, np.nan))
    mat = np.vstack(rows)
    if not _has_data(mat):  # no usable initial norms: show absolute distances
        relative = False
        mat = np.vstack([_series((modules[k] or {}).get("dist_init"), n) for k in names])
    if not _has_data(mat):
        return None, ["The per-module distances from initialisation are all null."]
    notes = []
    if len(names) > MAX_HEATMAP_MODULES:
        final = np.nan_to_num(mat[:, -1], nan=-np.inf)
        keep = sorted(np.argsort(-final, kind="stable")[:MAX_HEATMAP_MODULES].tolist())
        notes.append(
            f"The heat map shows the {MAX_HEATMAP_MODULES} modules (of {len(names)}) that ended farthest "
            "from initialisation, in model order; the module table and `--json` have all of them."
        )
        names = [names[i] for i in keep]
        mat = mat[keep]
    height = 1.3 + 0.19 * len(names)
    width = min(11.0, 4.8 + 0.28 * n + 0.055 * max(len(s) for s in names))
    fig = _new_figure(max(width, 6.5), height)
    ax = fig.subplots()
    ax.grid(False)
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 20 else 8)
    _checkpoint_ticks(ax, axis)
    ax.set_xlabel("checkpoint")
    label = "‖W − W₀‖ / ‖W₀‖" if relative else "‖W − W₀‖"
    fig.colorbar(im, ax=ax, label=label, shrink=0.9 if len(names) > 6 else 1.0)
    what = "relative distance from initialisation" if relative else "distance from initialisation"
    cap = (
        f"Per-module {what} ({_esc(label)}; the first checkpoint is the reference) over the checkpoints. "
        "Bright rows moved most; a row that stays dark did not train."
    )
    return _Figure(
        "fig-module-distance", f"Heat map of per-module {what}, modules by checkpoints", cap, _png(fig)
    ), notes


def _model_curves(w: Mapping[str, Any], axis: _Axis) -> _Figure | None:
    model = w.get("model")
    if not isinstance(model, Mapping):
        return None
    n = len(axis.points)
    panels = [
        ("distance from initialisation", _series(model.get("dist_init"), n)),
        ("step size (distance from the checkpoint before)", _series(model.get("dist_prev"), n)),
        ("weight norm", _series(model.get("norm"), n)),
    ]
    panels = [(t, s) for t, s in panels if _has_data(s)]
    if not panels:
        return None
    fig = _new_figure(3.7 * len(panels), 2.7)
    for ax, (title, s) in zip(_grid(fig, len(panels), len(panels)), panels, strict=True):
        _line(ax, axis, s, color="tab:blue", linewidth=1.4)
        ax.set_title(title, loc="left")
        ax.set_xlabel(axis.label)
    cap = (
        "The whole model as one vector: how far it has gone from the first checkpoint, how far it moved since the "
        "checkpoint before, and its norm. " + _path_stats(model)
    )
    return _Figure("fig-model-distance", "Whole-model distance from initialisation, step size and norm", cap, _png(fig))


def _path_stats(model: Mapping[str, Any]) -> str:
    bits = []
    if _num(model.get("path_length")) is not None:
        bits.append(f"path length {_fmt(model['path_length'])}")
    if _num(model.get("displacement")) is not None:
        bits.append(f"displacement {_fmt(model['displacement'])}")
    if _num(model.get("straightness")) is not None:
        bits.append(f"straightness {_fmt(model['straightness'], 3)} (displacement / path length; 1 is a straight line)")
    return ("Path: " + ", ".join(bits) + ".") if bits else ""


def _pca_figure(w: Mapping[str, Any], axis: _Axis) -> tuple[_Figure | None, list[str]]:
    pca = w.get("pca")
    if not isinstance(pca, Mapping):
        return None, ["No PCA trajectory in the weights analysis (computed with pca=True)."]
    coords = pca.get("coords")
    if not isinstance(coords, Sequence) or not coords:
        return None, ["The PCA trajectory has no coordinates."]
    xy = np.array(
        [
            [
                _num(c[0]) if _num(c[0]) is not None else np.nan,
                _num(c[1]) if len(c) > 1 and _num(c[1]) is not None else 0.0,
            ]
            if isinstance(c, Sequence) and c
            else [np.nan, np.nan]
            for c in coords
        ],
        dtype=np.float64,
    )
    ok = np.asarray(np.isfinite(xy).all(axis=1), dtype=bool)
    if not ok.any():
        return None, ["The PCA coordinates are all null."]
    evr = pca.get("explained_variance_ratio") or []
    fig = _new_figure(6.6, 4.6)
    ax = fig.subplots()
    order = np.arange(len(xy))
    ax.plot(xy[ok, 0], xy[ok, 1], "-", color="0.75", linewidth=1.0, zorder=1)
    sc = ax.scatter(
        xy[ok, 0], xy[ok, 1], c=order[ok], cmap="viridis", s=28, zorder=2, edgecolors="white", linewidths=0.5
    )
    first, last = int(np.flatnonzero(ok)[0]), int(np.flatnonzero(ok)[-1])
    ax.scatter(
        [xy[first, 0]],
        [xy[first, 1]],
        marker="s",
        s=70,
        facecolors="none",
        edgecolors="black",
        zorder=3,
        label="first checkpoint",
    )
    ax.scatter([xy[last, 0]], [xy[last, 1]], marker="*", s=140, color="tab:red", zorder=3, label="last checkpoint")
    pts = axis.points if len(axis.points) == len(xy) else [{"index": i} for i in range(len(xy))]
    for i in _pick(len(xy), 14):
        if ok[i]:
            ax.annotate(
                _short(pts[i]),
                (xy[i, 0], xy[i, 1]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color="0.25",
            )
    labels = []
    for k in range(2):
        r = _num(evr[k]) if k < len(evr) else None
        labels.append(f"PC{k + 1}" + (f" ({100 * r:.1f}% of variance)" if r is not None and math.isfinite(r) else ""))
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="best")
    fig.colorbar(sc, ax=ax, label="checkpoint (order)", shrink=0.85)
    method = pca.get("method")
    sketch = pca.get("sketch_dim")
    how = f" by {_esc(method)}" if method else ""
    how += f" of a {_esc(sketch)}-dimensional random sketch of the weights" if sketch else ""
    cap = (
        f"The checkpoints projected on the two leading principal components of the trajectory{how}; colour "
        "follows training order, labels are epochs (or steps). Axes have equal scale."
    )
    return _Figure("fig-pca", "PCA trajectory of the checkpoints in weight space", cap, _png(fig)), []


def _spectral_figure(w: Mapping[str, Any], axis: _Axis) -> _Figure | None:
    tensors = w.get("tensors")
    if not isinstance(tensors, Mapping):
        return None
    n = len(axis.points)
    cands = []
    for name, t in tensors.items():
        spec = t.get("spectral") if isinstance(t, Mapping) else None
        if isinstance(spec, Mapping):
            s = _series(spec.get("stable_rank"), n)
            if _has_data(s):
                shape = t.get("shape") or []
                numel = int(np.prod([int(x) for x in shape])) if shape else 0
                cands.append((numel, str(name), s))
    if not cands:
        return None
    cands.sort(key=lambda c: -c[0])
    shown = cands[:8]
    fig = _new_figure(7.4, 3.0)
    ax = fig.subplots()
    for _, name, s in shown:
        _line(ax, axis, s, label=name, linewidth=1.2)
    ax.set_title("stable rank (squared Frobenius norm / squared spectral norm)", loc="left")
    ax.set_xlabel(axis.label)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    more = f" ({len(shown)} largest of {len(cands)} matrices)" if len(cands) > len(shown) else ""
    cap = (
        f"Stable rank of the largest weight matrices{more}. A falling stable rank means the update concentrates "
        "in a few directions."
    )
    return _Figure("fig-spectral", "Stable rank of the largest weight matrices over the checkpoints", cap, _png(fig))


def _module_table(w: Mapping[str, Any], axis: _Axis, limit: int = 20) -> str:
    modules = w.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        return ""
    n = len(axis.points)
    rows = []
    for name, m in modules.items():
        m = m if isinstance(m, Mapping) else {}
        dist, norm = _series(m.get("dist_init"), n), _series(m.get("norm"), n)
        rel = dist[-1] / norm[0] if n and math.isfinite(norm[0]) and norm[0] > 0 else np.nan
        upd = _series(m.get("rel_update"), n)
        k = int(np.nanargmax(upd)) if _has_data(upd) else None
        cos = _series(m.get("cos_init"), n)
        rows.append(
            (
                rel,
                name,
                m.get("numel"),
                norm[0] if n else np.nan,
                dist[-1] if n else np.nan,
                cos[-1] if n else np.nan,
                upd[k] if k is not None else np.nan,
                k,
            )
        )
    rows.sort(key=lambda r: -r[0] if math.isfinite(r[0]) else math.inf)
    body = "".join(
        f"<tr><td><code>{_esc(name)}</code></td><td class=num>{_fmt_int(numel)}</td><td class=num>{_fmt(n0)}</td>"
        f"<td class=num>{_fmt(d)}</td><td class=num>{_fmt(rel, 3)}</td><td class=num>{_fmt(cos, 3)}</td>"
        f"<td class=num>{_fmt(u, 3)}{_at(axis, k)}</td></tr>"
        for rel, name, numel, n0, d, cos, u, k in rows[:limit]
    )
    more = (
        (
            f"<p class=note>The {limit} of {len(rows)} modules that moved most (relative to their initial norm); "
            "<code>--json</code> has all of them.</p>"
        )
        if len(rows) > limit
        else ""
    )
    return (
        "<table class=data><thead><tr><th>module</th><th>parameters</th><th>‖W<sub>0</sub>‖</th>"
        "<th>‖W<sub>T</sub> − W<sub>0</sub>‖</th><th>relative</th><th>cos(W<sub>T</sub>, W<sub>0</sub>)</th>"
        "<th>largest relative update</th></tr></thead>"
        f"<tbody>{body}</tbody></table>{more}"
    )


# ------------------------------------------------------------------------------------------------ representations


def _block_title(name: str, limit: int = 26) -> str:
    """A short name for a transformer block: ``visual.transformer.resblocks.3`` → ``image block 3``,
    ``transformer.resblocks.0`` → ``text block 0``; other names are shortened from the left."""
    m = re.search(r"resblocks\.(\d+)$", name)
    if m:
        prefix = name[: m.start()].rstrip(".")
        tower = (
            "image"
            if prefix.startswith("visual")
            else "text"
            if prefix in ("transformer", "text.transformer", "text")
            else prefix
        )
        return f"{tower} block {m.group(1)}"
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _heatmap(ax: Axes, mat: np.ndarray, axis: _Axis, title: str, annotate: bool) -> Any:
    ax.grid(False)
    im = ax.imshow(np.ma.masked_invalid(mat), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_title(title, loc="left")
    _checkpoint_ticks(ax, axis, "x", 8)
    _checkpoint_ticks(ax, axis, "y", 8)
    if annotate:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if math.isfinite(mat[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{mat[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if mat[i, j] < 0.6 else "black",
                    )
    return im


def _cka_figures(r: Mapping[str, Any], axis: _Axis) -> tuple[list[_Figure], list[str]]:
    cka = r.get("cka")
    n = len(axis.points)
    if not isinstance(cka, Mapping):
        return [], ["No CKA matrices in the representations analysis."]
    figs: list[_Figure] = []
    notes: list[str] = []
    mats = [(k, _matrix(cka.get(k), n)) for k in ("image", "text")]
    present = [(k, m) for k, m in mats if m is not None and _has_data(m)]
    if present:
        fig = _new_figure(3.9 * len(present) + 0.6, 3.6)
        axes = _grid(fig, len(present), len(present))
        im: Any = None
        for ax, (k, m) in zip(axes, present, strict=True):
            im = _heatmap(ax, m, axis, f"{k} embeddings", n <= 10)
        fig.colorbar(im, ax=axes, label="linear CKA", shrink=0.9)
        cap = (
            "Linear CKA between the probe's final embeddings at every pair of checkpoints (1: the same "
            "representation up to rotation and scale). A bright block is a phase where the representation "
            "stayed put."
        )
        figs.append(_Figure("fig-cka", "CKA heat maps of the final image and text embeddings", cap, _png(fig)))
    else:
        notes.append("No image/text CKA matrices (missing or all null).")
    blocks = cka.get("blocks")
    if isinstance(blocks, Mapping) and blocks:
        named = [(str(b), _matrix(m, n)) for b, m in blocks.items()]
        valid = [(b, m) for b, m in named if m is not None and _has_data(m)]
        if valid:
            figs.append(_block_lines(valid, axis))
            pick = [valid[i] for i in _pick(len(valid), MAX_BLOCK_MAPS)]
            cols = min(4, len(pick))
            rows = math.ceil(len(pick) / cols)
            fig = _new_figure(2.6 * cols + 0.7, 2.5 * rows + 0.2)
            axes = _grid(fig, len(pick), cols)
            im_b: Any = None
            for ax, (b, m) in zip(axes, pick, strict=True):
                im_b = _heatmap(ax, m, axis, _block_title(b), False)
                ax.title.set_fontsize(8)
                ax.tick_params(labelsize=6)
            fig.colorbar(im_b, ax=axes, label="linear CKA", shrink=0.8)
            sel = (
                f"{len(pick)} of {len(valid)} blocks, evenly spaced from first to last"
                if len(pick) < len(valid)
                else f"all {len(valid)} blocks"
            )
            cap = f"Checkpoint-by-checkpoint CKA inside the network ({_esc(sel)})."
            figs.append(_Figure("fig-cka-blocks", f"CKA heat maps of {sel}", cap, _png(fig)))
        else:
            notes.append("The per-block CKA matrices are all null.")
    else:
        notes.append("Per-block CKA was not computed (blocks=False, or the model's blocks could not be hooked).")
    return figs, notes


def _block_lines(blocks: Sequence[tuple[str, np.ndarray]], axis: _Axis) -> _Figure:
    from matplotlib import colormaps

    fig = _new_figure(7.6, 3.1)
    ax = fig.subplots()
    cmap = colormaps["plasma"]
    for k, (b, m) in enumerate(blocks):
        color = cmap(0.85 * k / max(1, len(blocks) - 1))
        _line(
            ax,
            axis,
            m[-1],
            label=_block_title(b) if len(blocks) <= 14 else None,
            color=color,
            linewidth=1.2,
            markersize=2,
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("CKA of each block with its final representation", loc="left")
    ax.set_xlabel(axis.label)
    if len(blocks) <= 14:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    cap = (
        "For every block, the CKA between its representation at each checkpoint and at the last one "
        "(colour from dark, the first block, to light, the last). Blocks whose curve reaches 1 early settled "
        "early."
    )
    return _Figure("fig-cka-to-final", "CKA of each block with its final representation", cap, _png(fig))


def _downstream_figure(r: Mapping[str, Any], axis: _Axis) -> tuple[_Figure | None, list[str]]:
    n = len(axis.points)
    panels: list[tuple[str, list[tuple[str, np.ndarray]], int | None]] = []
    notes: list[str] = []
    zs = r.get("zero_shot")
    if isinstance(zs, Mapping):
        series = [(k, _series(zs.get(k), n)) for k in ("top1", "top5")]
        series = [(k, s) for k, s in series if _has_data(s)]
        if series:
            panels.append(("zero-shot classification accuracy", series, int(np.nanargmax(series[0][1]))))
    else:
        notes.append("No zero-shot accuracy (the probe has no class names).")
    ret = r.get("retrieval")
    if isinstance(ret, Mapping):
        for direction, title in (
            ("image_to_text", "image → text retrieval"),
            ("text_to_image", "text → image retrieval"),
        ):
            d = ret.get(direction)
            if isinstance(d, Mapping):
                series = [(str(k), _series(v, n)) for k, v in d.items()]
                series = [(k, s) for k, s in series if _has_data(s)]
                if series:
                    panels.append((title, series, int(np.nanargmax(series[0][1]))))
    else:
        notes.append("No retrieval scores.")
    ed = r.get("effective_dim")
    if isinstance(ed, Mapping):
        series = [(k, _series(ed.get(k), n)) for k in ("image", "text")]
        series = [(k, s) for k, s in series if _has_data(s)]
        if series:
            panels.append(("effective dimension of the embeddings", series, None))
    if not panels:
        return None, [*notes, "No zero-shot, retrieval or effective-dimension values."]
    cols = 2 if len(panels) > 1 else 1
    fig = _new_figure(3.9 * cols + 0.4, 2.8 * math.ceil(len(panels) / cols) + 0.2)
    for ax, (title, series, best) in zip(_grid(fig, len(panels), cols), panels, strict=True):
        for lbl, s in series:
            _line(ax, axis, s, label=lbl, linewidth=1.4)
        _mark_best(ax, axis, series[0][1], best)
        ax.set_title(title, loc="left")
        ax.set_xlabel(axis.label)
        ax.legend(loc="best")
    cap = (
        "The probe's downstream scores at each checkpoint; the star marks the best checkpoint of the first curve "
        "(top-1, R@1). Effective dimension is the participation ratio of the embeddings' covariance spectrum."
    )
    alt = "Zero-shot accuracy, retrieval recall and effective dimension over the checkpoints"
    return _Figure("fig-zero-shot", alt, cap, _png(fig)), notes


# ------------------------------------------------------------------------------------------------ transfer


def _transfer_figure(t: Mapping[str, Any], axis: _Axis) -> _Figure | None:
    n = len(axis.points)
    acc, train = _series(t.get("accuracy"), n), _series(t.get("train_accuracy"), n)
    if not _has_data(acc) and not _has_data(train):
        return None
    best = _map(t.get("best"))
    bi: int | None = best["index"] if isinstance(best.get("index"), int) else None
    if bi is None and _has_data(acc):
        bi = int(np.nanargmax(acc))
    fig = _new_figure(7.0, 3.1)
    ax = fig.subplots()
    if _has_data(acc):
        _line(ax, axis, acc, label="test accuracy", color="tab:blue", linewidth=1.6)
    if _has_data(train):
        _line(ax, axis, train, label="train accuracy", color="tab:gray", linewidth=1.2, linestyle="--")
    _mark_best(ax, axis, acc, bi)
    ax.set_title("linear probe accuracy", loc="left")
    ax.set_xlabel(axis.label)
    ax.legend(loc="best")
    ds = _map(t.get("dataset"))
    name = _esc(ds.get("name") or "the transfer dataset")
    cap = (
        f"A linear classifier trained on frozen image features of each checkpoint, on {name}; the star marks the "
        "best checkpoint. A gap between train and test accuracy is the probe overfitting, not the model."
    )
    return _Figure("fig-transfer", "Transfer (linear probe) accuracy over the checkpoints", cap, _png(fig))


# ------------------------------------------------------------------------------------------------ HTML pieces


def _notes_html(notes: Sequence[str]) -> str:
    return "".join(f"<p class=note>{_md(n)}</p>" for n in notes)


def _md(text: str) -> str:
    """Escaped text with `code` spans (the only markup the notes use)."""
    parts = _esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _missing(reason: str) -> str:
    return f'<div class="missing"><strong>Not in this report.</strong> {_md(reason)}</div>'


def _section(key: str, body: str, subtitle: str = "") -> str:
    sub = f"<p class=lead>{subtitle}</p>" if subtitle else ""
    return f'<section id="{key}"><h2>{_esc(_TITLES[key])}</h2>{sub}{body}</section>'


_CONF_ORDER = {"high": 0, "medium": 1, "low": 2}


def _stability_html(s: Mapping[str, Any], run: _Run) -> tuple[str, dict[str, int]]:
    pts = _section_points(run, s)
    flags = []
    for f in s.get("flags") or []:
        if isinstance(f, Mapping):
            conf = str(f.get("confidence"))
            flags.append({**f, "confidence": conf if conf in _CONF_ORDER else "low"})
    checked = [str(c) for c in (s.get("checked") or [])]
    counts = {c: sum(1 for f in flags if f["confidence"] == c) for c in _CONF_ORDER}
    checked_html = ", ".join(f"<code>{_esc(c)}</code>" for c in checked) or "nothing"
    not_checked = _map(s.get("skipped"))
    skipped_html = (
        "<p class=note>Not checked: "
        + "; ".join(f"<code>{_esc(k)}</code> ({_esc(v)})" for k, v in not_checked.items())
        + ".</p>"
        if not_checked
        else ""
    )
    if not flags:
        body = (
            f'<div class="ok"><strong>No flags.</strong> Checked {checked_html} over {len(pts)} checkpoints; '
            f"none crossed its threshold.</div>{skipped_html}"
        )
        return body, counts

    def first_index(f: Mapping[str, Any]) -> int:
        return f["index"] if isinstance(f.get("index"), int) else len(pts)

    flags.sort(key=lambda f: (_CONF_ORDER[f["confidence"]], _CONF_ORDER.get(str(f.get("severity")), 0), first_index(f)))
    rows = []
    for f in flags:
        conf = f["confidence"]
        idx, last = f.get("index"), f.get("last_index")
        label = f.get("label")
        if label is None and isinstance(idx, int) and 0 <= idx < len(pts):
            label = pts[idx].get("label")
        first = _esc(label) if label is not None else "–"
        if isinstance(idx, int):
            first += f" <span class=dim>#{idx}</span>"
        if isinstance(last, int) and isinstance(idx, int) and last > idx:
            end = pts[last].get("label") if last < len(pts) else None
            first += f"<br><span class=dim>until {_esc(end) if end is not None else f'#{last}'}</span>"
        severity = f.get("severity")
        sev = f"<br><span class=dim>severity {_esc(severity)}</span>" if severity else ""
        detail = " · ".join(
            f"{k} {_fmt(f.get(k), 3)}" for k in ("score", "value", "threshold") if _num(f.get(k)) is not None
        )
        rows.append(
            f'<tr><td><span class="badge {conf}">{conf}</span>{sev}</td>'
            f"<td><code>{_esc(f.get('kind', '?'))}</code></td><td>{_esc(f.get('where') or 'model')}</td>"
            f"<td>{first}</td><td>{_esc(f.get('what') or '')}</td><td class=dim>{_esc(detail)}</td></tr>"
        )
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    body = (
        f"<p>{len(flags)} flag{'s' if len(flags) != 1 else ''} ({_esc(summary)} confidence). "
        f"Checked {checked_html}.</p>"
        "<table class=data id=flags><thead><tr><th>confidence</th><th>kind</th><th>where</th>"
        "<th>first checkpoint</th><th>what</th><th>evidence</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{skipped_html}"
    )
    return body, counts


def _checkpoint_table(run: _Run, curves: Mapping[str, Any]) -> str:
    from ckptstore.release import headline_metrics

    heads = headline_metrics(run.metadata, None, limit=4)
    loss = curves.get("loss") or {}
    avg, last = loss.get("avg") or [None] * run.n, loss.get("last") or [None] * run.n
    lr0 = (curves.get("lr") or [[None] * run.n])[0]
    idx = _pick(run.n, MAX_TABLE_ROWS)
    head = "".join(f"<th>{_esc(h)}</th>" for h in heads)
    rows = []
    for i in idx:
        p, meta = run.points[i], run.metadata[i]
        ms = _map(meta.get("metrics"))
        cells = "".join(f"<td class=num>{_fmt(ms.get(h))}</td>" for h in heads)
        tags: list[Any] = meta["tags"] if isinstance(meta.get("tags"), list) else []
        tag_html = "".join(f" <span class=tag>{_esc(t)}</span>" for t in tags[:5])
        rows.append(
            f"<tr><td class=num>{i}</td><td><code>{_esc(p.get('label'))}</code>{tag_html}</td>"
            f"<td class=num>{_fmt_int(p.get('step'))}</td><td class=num>{_fmt(p.get('epoch'))}</td>"
            f"<td class=num>{_fmt_int(meta.get('samples_seen'))}</td>"
            f"<td class=num>{_fmt(avg[i] if avg[i] is not None else last[i])}</td>"
            f"<td class=num>{_fmt(lr0[i] if i < len(lr0) else None, 3)}</td>{cells}</tr>"
        )
    more = (
        f"<p class=note>{len(idx)} of {run.n} checkpoints (first, last and evenly spaced).</p>"
        if len(idx) < run.n
        else ""
    )
    return (
        f"<details{' open' if run.n <= 12 else ''}><summary>{run.n} checkpoints</summary>"
        "<table class=data><thead><tr><th>#</th><th>checkpoint</th><th>step</th><th>epoch</th><th>samples</th>"
        f"<th>loss</th><th>lr</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}</details>"
    )


_CSS = """
:root{--fg:#1d2433;--dim:#5b6578;--line:#e3e7ee;--bg:#f6f8fb;--accent:#2f5bd3}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
header{background:#1d2433;color:#fff;padding:28px 0 22px}
.wrap{max-width:1160px;margin:0 auto;padding:0 28px}
header h1{margin:0 0 4px;font-size:24px;font-weight:650;letter-spacing:-.01em;word-break:break-word}
header .sub{color:#b9c2d3;font-size:13px}
nav{background:#fff;border-bottom:1px solid var(--line);position:sticky;top:0;z-index:1}
nav .wrap{display:flex;flex-wrap:wrap;gap:4px 18px;padding-top:9px;padding-bottom:9px}
nav a{color:var(--dim);text-decoration:none;font-size:13px;font-weight:550}
nav a:hover{color:var(--accent)}
nav a.off{color:#a9b1c0}
main .wrap{padding-top:22px;padding-bottom:40px}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:18px 22px 20px;margin:0 0 20px}
h2{margin:0 0 6px;font-size:18px;font-weight:650}
h3{margin:18px 0 6px;font-size:14px;font-weight:650}
.lead{color:var(--dim);margin:0 0 12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px;margin:4px 0 6px}
.card{border:1px solid var(--line);border-radius:8px;padding:9px 12px;background:#fbfcfe;min-width:0}
.card.wide{grid-column:span 2}
.card .k{color:var(--dim);font-size:11.5px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:15px;font-weight:600;word-break:break-word}
.card .v small{font-weight:400;color:var(--dim);font-size:12px}
figure{margin:14px 0 6px}
figure img{max-width:100%;height:auto;display:block;border:1px solid var(--line);border-radius:6px}
figcaption{color:var(--dim);font-size:12.5px;margin-top:6px;max-width:900px}
table.data{border-collapse:collapse;width:100%;font-size:12.5px;margin:8px 0}
table.data th{text-align:left;font-weight:600;color:var(--dim);border-bottom:2px solid var(--line);padding:5px 8px;
white-space:nowrap}
table.data td{border-bottom:1px solid var(--line);padding:5px 8px;vertical-align:top;word-break:break-word}
table.data tbody tr:nth-child(even){background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f1f3f7;padding:1px 4px;
border-radius:4px;word-break:break-all}
.dim{color:var(--dim)}
.note{color:var(--dim);font-size:12.5px;margin:6px 0}
.missing{border:1px dashed #c5ccd8;border-radius:8px;padding:10px 14px;color:var(--dim);background:#fafbfd}
.ok{border:1px solid #b9e0c6;background:#effaf2;color:#1c5a31;border-radius:8px;padding:10px 14px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:11.5px;font-weight:650;color:#fff}
.badge.high{background:#c9302c}.badge.medium{background:#d9822b}.badge.low{background:#6b7a90}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;margin:0 4px 2px 0}
.pill.yes{background:#e6f0ff;color:#1f48b0}.pill.no{background:#eef0f4;color:#8a93a3;text-decoration:line-through}
.tag{display:inline-block;font-size:11px;background:#eef2fb;color:#2f5bd3;border-radius:8px;padding:0 6px}
details summary{cursor:pointer;color:var(--accent);font-weight:550}
footer{color:var(--dim);font-size:12px;text-align:center;padding:0 0 30px}
"""


# ------------------------------------------------------------------------------------------------ the page


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
    return _jsonable(
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


def build_report(
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
) -> str:
    """The report as one self-contained HTML page.

    ``traj`` is the analysed :class:`~ckptstore.analysis.trajectory.Trajectory` (or its points); each analysis is
    its result, its ``to_dict()``, or ``None`` when it was not run. ``skipped`` maps a section name
    (``"representations"``...) to the reason it was not run, shown in its place. ``extra`` holds the sections of
    :mod:`ckptstore.analysis.report_landscape` by name (``averages``, ``interpolation``, ``optimizer``,
    ``plasticity``), shown when given.
    """
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency of the analysis extra
        raise MissingDependencyError("the report's plots need matplotlib", hint="pip install matplotlib") from exc
    from ckptstore import __version__

    inp = _inputs(traj, weights, stability, representations, transfer, title, skipped, generated, extra)
    with matplotlib.rc_context(_RC):
        return _page(inp, __version__)


def _page(inp: _Inputs, version: str) -> str:
    run = inp.run
    sec = inp.sections
    curves = _curves(run)
    parts: list[str] = []
    facts: list[tuple[str, str]] = []  # the summary cards (already escaped)

    # ---- training curves
    fig, notes = _curves_figure(run, curves)
    body = (fig.html() if fig else "") + _notes_html(notes)
    parts.append(_section("curves", body, "Loss, learning rate and eval metrics from the checkpoints' metadata."))

    # ---- stability
    if sec["stability"] is not None:
        body, counts = _stability_html(sec["stability"], run)
        n_flags = sum(counts.values())
        facts.append(
            (
                "stability flags",
                f"{n_flags}"
                + (f" <small>({counts['high']} high)</small>" if n_flags else " <small>none raised</small>"),
            )
        )
    else:
        body = _missing(inp.skipped["stability"])
    parts.insert(
        0,
        _section(
            "stability",
            body,
            "Loss spikes, non-finite or exploding weights, collapsing representations, frozen modules: each "
            "warning sign at the first checkpoint where it shows.",
        ),
    )

    # ---- weights
    w = sec["weights"]
    if w is not None:
        axis = _Axis.of(_section_points(run, w))
        figs: list[_Figure | None] = []
        notes = []
        heat, nt = _module_heatmap(w, axis)
        figs.append(heat)
        notes += nt
        figs.append(_model_curves(w, axis))
        pca, nt = _pca_figure(w, axis)
        figs.append(pca)
        notes += nt
        spectral = _spectral_figure(w, axis)
        if spectral is None:
            notes.append("No spectral statistics (computed unless `--no-spectral` / spectral=False).")
        figs.append(spectral)
        body = "".join(f.html() for f in figs if f) + _notes_html(notes)
        table = _module_table(w, axis)
        if table:
            body += "<h3>Modules</h3>" + table
        model = _map(w.get("model"))
        if _num(model.get("straightness")) is not None:
            facts.append(("path straightness", _fmt(model["straightness"], 3)))
    else:
        body = _missing(inp.skipped["weights"])
    parts.append(_section("weights", body, "How far and how straight the weights travelled, module by module."))

    # ---- representations
    r = sec["representations"]
    if r is not None:
        axis = _Axis.of(_section_points(run, r))
        probe = _map(r.get("probe"))
        classes = probe.get("classes")
        n_classes = len(classes) if isinstance(classes, list) else classes
        sub = (
            f"Probe <code>{_esc(probe.get('name') or '?')}</code>: {_fmt_int(probe.get('n_images'))} images, "
            f"{_fmt_int(probe.get('n_texts'))} texts, {_fmt_int(n_classes)} classes."
        )
        figs_r, notes = _cka_figures(r, axis)
        down, nt = _downstream_figure(r, axis)
        notes += nt
        body = "".join(f.html() for f in [*figs_r, down] if f) + _notes_html(notes)
        top1 = _series((r.get("zero_shot") or {}).get("top1"), len(axis.points))
        if _has_data(top1):
            b = int(np.nanargmax(top1))
            facts.append(
                ("best zero-shot top-1", f"{_fmt(top1[b], 3)} <small>at {_esc(axis.points[b].get('label'))}</small>")
            )
    else:
        sub, body = "", _missing(inp.skipped["representations"])
    parts.append(_section("representations", body, sub or "How the model's embeddings of a probe set changed."))

    # ---- transfer
    t = sec["transfer"]
    if t is not None:
        axis = _Axis.of(_section_points(run, t))
        ds = _map(t.get("dataset"))
        classes = ds.get("classes")
        n_classes = len(classes) if isinstance(classes, list) else classes
        sub = (
            f"Dataset <code>{_esc(ds.get('name') or '?')}</code>: {_fmt_int(ds.get('n_train'))} train, "
            f"{_fmt_int(ds.get('n_test'))} test examples, {_fmt_int(n_classes)} classes."
        )
        fig = _transfer_figure(t, axis)
        body = fig.html() if fig else _notes_html(["The transfer accuracies are all null."])
        best = _map(t.get("best"))
        if _num(best.get("accuracy")) is not None:
            where = best.get("label") or (f"#{best['index']}" if best.get("index") is not None else "?")
            body += (
                f"<p>Best checkpoint: <code>{_esc(where)}</code>, test accuracy "
                f"<strong>{_fmt(best['accuracy'], 3)}</strong>.</p>"
            )
            facts.append(("best transfer accuracy", f"{_fmt(best['accuracy'], 3)} <small>at {_esc(where)}</small>"))
    else:
        sub, body = "", _missing(inp.skipped["transfer"])
    parts.append(_section("transfer", body, sub or "How useful each checkpoint's features are for a new task."))

    parts += landscape.sections_html(sec)
    parts.append(_section("checkpoints", _checkpoint_table(run, curves)))
    return _wrap(inp, version, parts, facts, curves)


def _wrap(inp: _Inputs, version: str, parts: list[str], facts: list[tuple[str, str]], curves: Mapping[str, Any]) -> str:
    run = inp.run
    first, last = run.points[0], run.points[-1]
    loss = curves.get("loss") or {}
    final_loss = next((v for v in (loss.get("avg", [None])[-1], loss.get("last", [None])[-1]) if v is not None), None)
    epochs = [p["epoch"] for p in run.points if isinstance(p.get("epoch"), int | float)]
    steps = [p["step"] for p in run.points if isinstance(p.get("step"), int)]
    cards = [
        ("run", f"{_esc(run.name)}"),
        (
            "checkpoints",
            f"{run.n} <small>{_esc(first['label'])} → {_esc(last['label'])}</small>"
            if run.n > 1
            else f"1 <small>{_esc(first['label'])}</small>",
        ),
        ("model", _esc(run.model) if run.model else "<small>not recorded</small>"),
        ("steps", f"{_fmt_int(min(steps))} → {_fmt_int(max(steps))}" if steps else "<small>not recorded</small>"),
    ]
    if epochs:
        cards.append(("epochs", f"{min(epochs):g} → {max(epochs):g}"))
    if final_loss is not None:
        cards.append(("final training loss", _fmt(final_loss)))
    cards += facts
    analysed = "".join(
        f'<span class="pill {"yes" if inp.sections[k] is not None else "no"}">{k}</span>' for k in SECTIONS
    )
    cards.append(("analysed", analysed))
    cards_html = "".join(
        f'<div class="card{" wide" if k == "analysed" else ""}"><div class="k">{_esc(k)}</div>'
        f'<div class="v">{v}</div></div>'
        for k, v in cards
    )
    nav = "".join(
        f'<a href="#{k}"{" class=off" if k in inp.sections and inp.sections[k] is None else ""}>{_esc(_TITLES[k])}</a>'
        for k in ("stability", "curves", "weights", "representations", "transfer", "checkpoints")
    )
    skipped = ""
    if inp.skipped:
        items = "".join(f"<li><strong>{_esc(k)}</strong>: {_md(v)}</li>" for k, v in inp.skipped.items())
        skipped = f'<div class="missing" id="skipped"><strong>Not analysed.</strong><ul>{items}</ul></div>'
    summary = f'<section id="summary"><h2>Summary</h2><div class="cards">{cards_html}</div>{skipped}</section>'
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="ckptstore {_esc(version)}">'
        f"<title>{_esc(inp.title)}</title><style>{_CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{_esc(inp.title)}</h1><div class="sub">{run.n} checkpoints · generated '
        f"{_esc(inp.generated)} by ckptstore {_esc(version)}</div></div></header>"
        f'<nav><div class="wrap"><a href="#summary">Summary</a>{nav}</div></nav>'
        f'<main><div class="wrap">{summary}{"".join(parts)}</div></main>'
        f"<footer>{REPORT_FORMAT} v{REPORT_VERSION} · made with <code>ckpt report</code> · the same data: "
        "<code>ckpt report --json</code></footer></body></html>\n"
    )


def write_report(
    traj: Trajectory | Sequence[Point],
    path: str | os.PathLike[str],
    **kwargs: Any,
) -> Path:
    """:func:`build_report` written to ``path`` (atomically: a temporary file renamed into place). Returns the path."""
    page = build_report(traj, **kwargs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
