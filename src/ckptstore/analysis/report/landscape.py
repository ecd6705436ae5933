"""The report's sections for averages, interpolation, optimizer state and plasticity (docs/analysis-averages.md).

Self-contained: each function takes an analysis's ``to_dict()`` and returns one ``<section>`` of HTML with its
figures inlined as PNG (matplotlib on the Agg canvas, no pyplot), in the markup the rest of the report uses. The
report lists them after its own analyses (:data:`SECTIONS`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SECTIONS = ("averages", "interpolation", "optimizer", "plasticity")
TITLES = {
    "averages": "Weight averages",
    "interpolation": "Interpolation and barriers",
    "optimizer": "Optimizer state",
    "plasticity": "Plasticity",
}
_DPI = 110


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _arr(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in (values or [])], dtype=np.float64)


def _figure(draw: Callable[[Any], None], alt: str, caption: str, width: float = 7.5, height: float = 3.0) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in fig.axes:  # the report turns mathtext off, so log axes get plain labels ("0.001", not "$10^{-3}$")
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    w, h = round(width * 96), round(height * 96)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}" width="{w}" height="{h}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _integer_x(*axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(key: str, body: str, lead: str) -> str:
    return f'<section id="{key}"><h2>{_esc(TITLES[key])}</h2><p class=lead>{_esc(lead)}</p>{body}</section>'


def _labels(d: Mapping[str, Any]) -> list[str]:
    return [str(p.get("label")) for p in d.get("points") or []]


# ------------------------------------------------------------------------------------------- sections
def averages_html(d: Mapping[str, Any]) -> str:
    rows = [
        [
            c["name"],
            ", ".join(c["refs"]) if len(c["refs"]) <= 3 else f"{c['refs'][0]} … {c['refs'][-1]}",
            _f(c.get("loss")),
            _f(c.get("top1"), 3),
            _f(c.get("top5"), 3),
        ]
        for c in d.get("candidates", [])
    ]
    best = ", ".join(f"{k}: {v}" for k, v in (d.get("best") or {}).items())
    body = _table(["candidate", "checkpoints", "loss", "top-1", "top-5"], rows)
    return _section(
        "averages",
        body + f"<p>Best — {_esc(best)}</p>",
        "The last checkpoint against uniform "
        "averages of the last k (LAWA) and an EMA over the run, evaluated on the probe.",
    )


def interpolation_html(d: Mapping[str, Any]) -> str:
    alphas = d.get("alphas") or []
    paths = d.get("paths") or []

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for p in paths[:8]:
            lab = " → ".join(p["labels"])
            ax1.plot(alphas, p["metrics"]["loss"], marker="o", ms=3, label=lab)
            if "top1" in p["metrics"]:
                ax2.plot(alphas, p["metrics"]["top1"], marker="o", ms=3, label=lab)
        ax1.set(xlabel="α (0 = first, 1 = second checkpoint)", ylabel="zero-shot loss", title="loss along the line")
        ax2.set(xlabel="α", ylabel="top-1", title="accuracy along the line")
        ax1.legend()

    rows = [[" → ".join(p["labels"]), _f(p["barrier"].get("loss")), _f(p["barrier"].get("top1"), 3)] for p in paths]
    body = _figure(
        draw,
        "loss and accuracy along straight lines between checkpoints",
        "Each line: the model (1−α)·A + α·B evaluated on the probe.",
    ) + _table(["pair", "loss barrier", "top-1 barrier"], rows)
    return _section(
        "interpolation",
        body,
        "Loss barrier: the largest rise of the loss above the straight line "
        "between the two ends (0 = linearly connected).",
    )


def optimizer_html(d: Mapping[str, Any], top: int = 8) -> str:
    labels = _labels(d)
    tensors = d.get("tensors") or {}
    moved = sorted(tensors, key=lambda n: -float(np.nansum(_arr(tensors[n]["rel_update"]))))[:top]

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        x = np.arange(len(labels))
        ax1.plot(x, _arr(d["model"]["rel_update"]), color="k", lw=2, label="whole model")
        for n in moved:
            ax1.plot(x, _arr(tensors[n]["rel_update"]), lw=1, label=n[-40:])
        ax1.set(yscale="log", title="relative update ‖Δθ‖/‖θ‖", xlabel="checkpoint")
        _integer_x(ax1, ax2)
        ax1.legend(fontsize=6)
        for n in moved:
            eff = tensors[n].get("eff_step") or {}
            if eff:
                ax2.plot(x, _arr(eff.get("median")), lw=1, label=n[-40:])
        ax2.set(yscale="log", title="Adam step lr/(√v̂+ε), median", xlabel="checkpoint")

    fig = _figure(
        draw,
        "relative update and effective step per tensor",
        f"The {len(moved)} tensors with the largest total relative update; parameters matched by {d.get('mapping')}.",
        height=3.2,
    )
    spikes = d.get("spikes") or []
    rows = [[s["tensor"], s["label"], _f(s["rel_update"]), _f(s["median"])] for s in spikes[:15]]
    near = [(n, (t.get("v_near_zero") or [None])[-1]) for n, t in tensors.items()]
    near = sorted([(n, v) for n, v in near if v], key=lambda kv: -kv[1])[:8]
    body = (
        fig
        + f"<h3>Update spikes ({len(spikes)})</h3>"
        + (_table(["tensor", "checkpoint", "‖Δθ‖/‖θ‖", "median"], rows) if rows else "<p>None.</p>")
    )
    if near:
        body += "<h3>Second moment near zero (last checkpoint)</h3>" + _table(
            ["tensor", "fraction √v̂ ≤ ε"], [[n, _f(v, 3)] for n, v in near]
        )
    return _section(
        "optimizer",
        body,
        "How much each tensor still moves per checkpoint, and the step size Adam's second moment gives it.",
    )


def plasticity_html(d: Mapping[str, Any], top: int = 10) -> str:
    labels = _labels(d)
    dormant = d.get("dormant") or {}
    weights = d.get("weights") or {}
    mats = [n for n, w in weights.items() if "stable_rank" in w][:top]

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        x = np.arange(len(labels))
        for n, rec in dormant.items():
            ax1.plot(x, _arr(rec["fraction"]), lw=1, label=n[-36:])
        ax1.set(title=f"τ-dormant fraction (τ = {d.get('tau')})", xlabel="checkpoint")
        _integer_x(ax1, ax2)
        if dormant:
            ax1.legend(fontsize=6)
        for n in mats:
            ax2.plot(x, _arr(weights[n]["stable_rank"]), lw=1, label=n[-36:])
        ax2.set(title="stable rank of weight matrices", xlabel="checkpoint")

    tot = d.get("dormant_total") or {}
    rows = [
        [
            n,
            _f(w["stable_rank"][0]),
            _f(w["stable_rank"][-1]),
            _f(w["effective_rank"][0]),
            _f(w["effective_rank"][-1]),
            _f(w["growth"][-1], 3),
        ]
        for n, w in weights.items()
        if "stable_rank" in w
    ]
    body = _figure(
        draw,
        "dormant units and stable rank over the run",
        "Dormant: units whose mean |activation| is at most τ times their layer's average.",
    )
    if tot.get("count"):
        body += f"<p>Dormant units: {tot['count'][0]} → {tot['count'][-1]} of {tot['units']}.</p>"
    body += _table(["matrix", "stable rank first", "last", "effective rank first", "last", "norm growth"], rows)
    return _section(
        "plasticity", body, "Is the model losing its ability to learn: dormant units, falling rank, growing weights."
    )


_RENDER: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "averages": averages_html,
    "interpolation": interpolation_html,
    "optimizer": optimizer_html,
    "plasticity": plasticity_html,
}


def sections_html(sections: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """The HTML of each of :data:`SECTIONS` present in ``sections``, in order."""
    return [_RENDER[k](v) for k in SECTIONS if (v := sections.get(k)) is not None]
