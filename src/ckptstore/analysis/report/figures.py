"""The report's figures: private matplotlib ``Figure`` objects on the Agg canvas, returned as PNG bytes (the global
backend and rcParams of the calling program are never touched)."""

from __future__ import annotations

import base64
import io
import math
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis.report.data import (
    _Axis,
    _esc,
    _fmt,
    _has_data,
    _map,
    _matrix,
    _metric_family,
    _num,
    _pick,
    _Run,
    _series,
    _short,
    _ticks,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


#: At most this many modules in the distance-from-init heat map (the ones that moved most, kept in model order).
MAX_HEATMAP_MODULES = 40


#: At most this many per-block CKA heat maps (evenly spaced through the blocks, first and last included).
MAX_BLOCK_MAPS = 8


#: At most this many metric panels in the curves figure.
MAX_METRIC_PANELS = 12


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

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """The figure laid out and drawn once: ``tight_layout`` measures every axes (with its labels, legends and
    colorbars) in one pass and fixes the margins, then one draw renders the PNG. (The constrained layout engine
    measured each axes twice and ``savefig`` drew the figure twice: 40% of the report's figure time.)"""
    from matplotlib.layout_engine import TightLayoutEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a figure tight_layout cannot improve keeps its positions
        # The engine applied once, not set on the figure: ``fig.tight_layout()`` would leave a placeholder engine,
        # and ``savefig`` draws a figure with any engine twice.
        TightLayoutEngine(pad=0.6, h_pad=0.8, w_pad=0.8).execute(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _grid(fig: Figure, n: int, cols: int) -> list[Axes]:
    rows = max(1, math.ceil(n / cols))
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _grid_with_colorbar(fig: Figure, n: int, cols: int, shrink: float) -> tuple[list[Axes], Axes]:
    """:func:`_grid` and, in a narrow column on its right, the axes of one colorbar for all of them (``shrink``:
    its share of the grid's height, centred), so the layout can place the colorbar like any other axes."""
    rows = max(1, math.ceil(n / cols))
    gs = fig.add_gridspec(rows, cols + 1, width_ratios=[1.0] * cols + [0.05])
    axes = [fig.add_subplot(gs[r, c]) for r in range(rows) for c in range(cols)]
    for ax in axes[n:]:
        ax.set_visible(False)
    pad = (1.0 - shrink) / 2
    inner = gs[:, cols].subgridspec(3, 1, height_ratios=[pad, shrink, pad], hspace=0)
    import matplotlib

    with matplotlib.rc_context({"axes.grid": False}):  # the report's rc grids every axes; not a colour scale
        cax = fig.add_subplot(inner[1])
    return axes[:n], cax


def _colorbar(fig: Figure, mappable: Any, cax: Axes, label: str) -> None:
    fig.colorbar(mappable, cax=cax, label=label)


def _line(ax: Axes, axis: _Axis, y: np.ndarray, label: str | None = None, **kw: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    if axis.x.size <= 80:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 3)
    ax.plot(axis.x, y, label=label, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))  # steps are whole numbers


def _mark_best(ax: Axes, axis: _Axis, y: np.ndarray, index: int | None, color: str = "tab:red") -> None:
    """A star on the best checkpoint of a curve, with its value; none on a flat curve (no checkpoint is best)."""
    if index is None or not (0 <= index < y.size) or not math.isfinite(y[index]):
        return
    finite = y[np.isfinite(y)]
    if finite.size < 2 or float(finite.max() - finite.min()) <= 1e-12 * max(1.0, abs(float(finite.max()))):
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
        if len(series) > 1:  # beside the axes, so it never covers a curve (R@10 sits where "best" would put it)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
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
    (ax,), cax = _grid_with_colorbar(fig, 1, 1, 0.9 if len(names) > 6 else 1.0)
    ax.grid(False)
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 20 else 8)
    _checkpoint_ticks(ax, axis)
    ax.set_xlabel("checkpoint")
    label = "‖W − W₀‖ / ‖W₀‖" if relative else "‖W − W₀‖"
    _colorbar(fig, im, cax, label)
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
        ("step size (from the checkpoint before)", _series(model.get("dist_prev"), n)),
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
    (ax,), cax = _grid_with_colorbar(fig, 1, 1, 0.85)
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
    _colorbar(fig, sc, cax, "checkpoint (order)")
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
        axes, cax = _grid_with_colorbar(fig, len(present), len(present), 0.9)
        im: Any = None
        for ax, (k, m) in zip(axes, present, strict=True):
            im = _heatmap(ax, m, axis, f"{k} embeddings", n <= 10)
        _colorbar(fig, im, cax, "linear CKA")
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
            axes, cax = _grid_with_colorbar(fig, len(pick), cols, 0.8)
            im_b: Any = None
            for ax, (b, m) in zip(axes, pick, strict=True):
                im_b = _heatmap(ax, m, axis, _block_title(b), False)
                ax.title.set_fontsize(8)
                ax.tick_params(labelsize=6)
            _colorbar(fig, im_b, cax, "linear CKA")
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
            ("image_to_text", "image → text retrieval (probe set)"),
            ("text_to_image", "text → image retrieval (probe set)"),
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
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    cap = (
        "The probe set's downstream scores at each checkpoint (the report's own probe, not the training log's "
        "validation recall shown with the metric curves); the star marks the best checkpoint of the first curve "
        "(top-1, R@1). Effective dimension is the participation ratio of the embeddings' covariance spectrum."
    )
    alt = "Zero-shot accuracy, retrieval recall and effective dimension over the checkpoints"
    return _Figure("fig-zero-shot", alt, cap, _png(fig)), notes


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
