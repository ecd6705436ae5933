"""The report's page: HTML sections around the figures, the CSS, :func:`build_report` and :func:`write_report`."""

from __future__ import annotations

import datetime as _dt
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis.report import landscape
from ckptstore.analysis.report.data import (
    REPORT_FORMAT,
    REPORT_VERSION,
    SECTIONS,
    _at,
    _Axis,
    _curves,
    _esc,
    _fmt,
    _fmt_int,
    _has_data,
    _Inputs,
    _inputs,
    _map,
    _num,
    _pick,
    _Run,
    _section_points,
    _series,
)
from ckptstore.analysis.report.figures import (
    _RC,
    _cka_figures,
    _curves_figure,
    _downstream_figure,
    _Figure,
    _model_curves,
    _module_heatmap,
    _pca_figure,
    _spectral_figure,
    _transfer_figure,
)
from ckptstore.errors import MissingDependencyError

if TYPE_CHECKING:
    from ckptstore.analysis.trajectory import Point, Trajectory


#: At most this many rows in the checkpoint table (first, last and evenly spaced between).
MAX_TABLE_ROWS = 60


_TITLES = {
    "curves": "Training curves",
    "stability": "Stability flags",
    "weights": "Weight dynamics",
    "representations": "Representations",
    "transfer": "Transfer",
    "checkpoints": "Checkpoints",
}


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
                norm[-1] if n else np.nan,
                dist[-1] if n else np.nan,
                cos[-1] if n else np.nan,
                upd[k] if k is not None else np.nan,
                k,
            )
        )
    rows.sort(key=lambda r: -r[0] if math.isfinite(r[0]) else math.inf)
    body = "".join(
        f"<tr><td><code>{_esc(name)}</code></td><td class=num>{_fmt_int(numel)}</td><td class=num>{_fmt(n0)}</td>"
        f"<td class=num>{_fmt(nt)}</td><td class=num>{_fmt(d)}</td><td class=num>{_fmt(rel, 3)}</td>"
        f"<td class=num>{_fmt(cos, 3)}</td>"
        f"<td class=num>{_fmt(u, 3)}{_at(axis, k)}</td></tr>"
        for rel, name, numel, n0, nt, d, cos, u, k in rows[:limit]
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
        "<th>‖W<sub>T</sub>‖</th><th>‖W<sub>T</sub> − W<sub>0</sub>‖</th><th>relative</th>"
        "<th>cos(W<sub>T</sub>, W<sub>0</sub>)</th>"
        "<th>largest relative update</th></tr></thead>"
        f"<tbody>{body}</tbody></table>{more}"
    )


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
    :mod:`ckptstore.analysis.report.landscape` by name (``averages``, ``interpolation``, ``optimizer``,
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
    curves = _curves(inp.run)
    facts: list[tuple[str, str]] = []  # the summary cards (already escaped), in the order of the sections
    fig, notes = _curves_figure(inp.run, curves)
    body = (fig.html() if fig else "") + _notes_html(notes)
    parts = [_section("curves", body, "Loss, learning rate and eval metrics from the checkpoints' metadata.")]
    parts.insert(0, _stability_part(inp, facts))
    parts.append(_weights_part(inp, facts))
    parts.append(_representations_part(inp, facts))
    parts.append(_transfer_part(inp, facts))
    parts += landscape.sections_html(inp.sections)
    parts.append(_section("checkpoints", _checkpoint_table(inp.run, curves)))
    return _wrap(inp, version, parts, facts, curves)


def _stability_part(inp: _Inputs, facts: list[tuple[str, str]]) -> str:
    """The stability section; its flag count goes to the summary cards."""
    if inp.sections["stability"] is not None:
        body, counts = _stability_html(inp.sections["stability"], inp.run)
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
    return _section(
        "stability",
        body,
        "Loss spikes, non-finite or exploding weights, collapsing representations, frozen modules: each "
        "warning sign at the first checkpoint where it shows.",
    )


def _weights_part(inp: _Inputs, facts: list[tuple[str, str]]) -> str:
    """The weights section: module heat map, model curves, PCA, spectra, module table; path straightness."""
    w = inp.sections["weights"]
    if w is not None:
        axis = _Axis.of(_section_points(inp.run, w))
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
    return _section("weights", body, "How far and how straight the weights travelled, module by module.")


def _representations_part(inp: _Inputs, facts: list[tuple[str, str]]) -> str:
    """The representations section: CKA and downstream figures; the best zero-shot top-1."""
    r = inp.sections["representations"]
    if r is not None:
        axis = _Axis.of(_section_points(inp.run, r))
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
    return _section("representations", body, sub or "How the model's embeddings of a probe set changed.")


def _transfer_part(inp: _Inputs, facts: list[tuple[str, str]]) -> str:
    """The transfer section: accuracy per checkpoint; the best one."""
    t = inp.sections["transfer"]
    if t is not None:
        axis = _Axis.of(_section_points(inp.run, t))
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
    return _section("transfer", body, sub or "How useful each checkpoint's features are for a new task.")


def _wrap(inp: _Inputs, version: str, parts: list[str], facts: list[tuple[str, str]], curves: Mapping[str, Any]) -> str:
    run = inp.run
    first, last = run.points[0], run.points[-1]
    loss = curves.get("loss") or {}
    final_loss, loss_label = next(
        ((v, lbl) for v, lbl in ((loss.get("avg", [None])[-1], "training loss (mean of the last epoch)"),
                                 (loss.get("last", [None])[-1], "last logged training loss")) if v is not None),
        (None, ""),
    )  # fmt: skip
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
        cards.append((loss_label, _fmt(final_loss)))
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
