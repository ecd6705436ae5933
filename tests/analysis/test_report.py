"""The HTML report: every section from hand-made analysis records, missing sections and nulls, escaping,
self-containment (no fetches, every plot a decodable PNG), and ``ckpt report`` end to end on the demo run."""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ckptstore.analysis import MemoryTrajectory
from ckptstore.analysis.report import (
    MAX_HEATMAP_MODULES,
    REPORT_FORMAT,
    ReportError,
    build_report,
    report_json,
    write_report,
)

HOSTILE = '<script>alert("x")</script>&"\'$\\alpha$'


# ---------------------------------------------------------------------------------------------- sample data


def make_traj(t: int = 6, *, hostile: bool = False, metrics: bool = True) -> MemoryTrajectory:
    """A tiny in-memory trajectory whose metadata looks like an ingested open_clip run."""
    states = [{"w": np.full((2, 2), float(i), dtype=np.float32)} for i in range(t)]
    metas = []
    for i in range(t):
        meta: dict[str, Any] = {
            "step": 100 * i,
            "epoch": i,
            "samples_seen": 6400 * i,
            "model": "ckpt-tiny-ViT",
            "loss": {"last": 3.0 / (i + 1), "avg": 3.2 / (i + 1), "window": 10},
            "lr": [5e-4 * math.cos(i / t), 5e-4 * math.cos(i / t)],
        }
        if metrics:
            meta["metrics"] = {
                "clip_val_loss": 2.5 / (i + 1),
                "image_to_text_R@1": 0.1 * i,
                "image_to_text_R@5": 0.15 * i,
                "text_to_image_R@1": 0.09 * i,
                "image_to_text_mean_rank": 50 - i,
            }
            if hostile:
                meta["metrics"][HOSTILE] = float(i)
        metas.append(meta)
    labels = [f"{HOSTILE}@{i}" if hostile else f"run@{i}" for i in range(t)]
    return MemoryTrajectory(states, metadata=metas, labels=labels)


def _points(t: int, hostile: bool = False) -> list[dict[str, Any]]:
    return [
        {"index": i, "label": f"{HOSTILE}@{i}" if hostile else f"run@{i}", "step": 100 * i, "epoch": i}
        for i in range(t)
    ]


def _curve(t: int, start: float, end: float, rng: np.random.Generator) -> list[float]:
    return [float(v) for v in np.linspace(start, end, t) + rng.normal(0, 0.01 * abs(end - start) + 1e-9, t)]


def make_weights(t: int = 6, n_modules: int = 12, *, hostile: bool = False, spectral: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    modules: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for k in range(n_modules):
        name = f"visual.transformer.resblocks.{k}.mlp" if k else "token_embedding"
        if hostile and k == 1:
            name = HOSTILE
        norm = _curve(t, 10 + k, 11 + k, rng)
        dist = [0.0, *np.cumsum(np.abs(rng.normal(0.2 + 0.05 * k, 0.05, t - 1))).tolist()]
        modules[name] = {
            "norm": norm,
            "dist_init": dist,
            "dist_prev": [None, *np.diff(dist).tolist()],
            "rel_update": [None, *(np.diff(dist) / 10).tolist()],
            "cos_init": _curve(t, 1, 0.9, rng),
            "cos_final": _curve(t, 0.9, 1, rng),
            "numel": 1000 * (k + 1),
        }
        tensors[f"{name}.weight"] = {
            "module": name,
            "shape": [32, 16],
            **{
                key: modules[name][key]
                for key in ("norm", "dist_init", "dist_prev", "rel_update", "cos_init", "cos_final")
            },
        }
        if spectral:
            tensors[f"{name}.weight"]["spectral"] = {
                "top_sv": _curve(t, 1, 3, rng),
                "stable_rank": _curve(t, 12, 6, rng),
                "effective_rank": _curve(t, 14, 9, rng),
            }
    dist = np.cumsum([0.0, *np.abs(rng.normal(1, 0.2, t - 1))])
    angle = np.linspace(0, 1.2, t)
    return {
        "points": _points(t, hostile),
        "tensors": tensors,
        "modules": modules,
        "model": {
            "norm": _curve(t, 100, 104, rng),
            "dist_init": (dist * 0.8).tolist(),
            "dist_prev": [None, *np.diff(dist).tolist()],
            "path_length": float(dist[-1]),
            "displacement": float(dist[-1] * 0.8),
            "straightness": 0.8,
        },
        "pca": {
            "coords": np.c_[np.cos(angle) * dist, np.sin(angle) * dist].tolist(),
            "explained_variance_ratio": [0.71, 0.18],
            "method": "randomized-svd",
            "sketch_dim": 4096,
        },
    }


def make_stability(t: int = 6, *, flags: bool = True, hostile: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "points": _points(t, hostile),
        "checked": ["loss_spike", "dead_module", "rank_collapse"],
        "skipped": {"logit_scale_clamp": "no logit_scale tensor"},
        "flags": [],
    }
    if flags:
        out["flags"] = [
            {
                "severity": "high",
                "last_index": 4,
                "kind": "loss_spike",
                "where": "model",
                "index": 3,
                "label": _points(t, hostile)[3]["label"],
                "what": "loss rose 4.2x above its running median",
                "confidence": "high",
                "score": 4.2,
                "value": 5.1,
                "threshold": 3.0,
            },
            {
                "kind": HOSTILE if hostile else "dead_module",
                "where": HOSTILE if hostile else "visual.conv1",
                "index": 1,
                "label": None,
                "what": HOSTILE if hostile else "weights did not change after checkpoint 1",
                "confidence": "low",
                "score": None,
                "value": 0.0,
                "threshold": 1e-8,
            },
        ]
    return out


def make_representations(t: int = 6, *, blocks: int = 10, hostile: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(1)

    def cka(scale: float) -> list[list[float]]:
        idx = np.arange(t)
        return np.clip(1 - scale * np.abs(idx[:, None] - idx[None, :]) / t, 0, 1).tolist()  # type: ignore[no-any-return]

    return {
        "points": _points(t, hostile),
        "probe": {
            "name": HOSTILE if hostile else "digits",
            "n_images": 512,
            "n_texts": 80,
            "classes": [str(c) for c in range(10)],
        },
        "cka": {
            "image": cka(0.8),
            "text": cka(0.5),
            "blocks": {f"{HOSTILE if hostile else 'visual'}.resblocks.{b}": cka(0.2 + 0.08 * b) for b in range(blocks)},
        },
        "zero_shot": {"top1": _curve(t, 0.1, 0.6, rng), "top5": _curve(t, 0.5, 0.95, rng)},
        "retrieval": {
            d: {"R@1": _curve(t, 0.05, 0.3, rng), "R@5": _curve(t, 0.2, 0.6, rng), "R@10": _curve(t, 0.3, 0.75, rng)}
            for d in ("image_to_text", "text_to_image")
        },
        "effective_dim": {"image": _curve(t, 20, 35, rng), "text": _curve(t, 15, 30, rng)},
    }


def make_transfer(t: int = 6) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    acc = _curve(t, 0.3, 0.8, rng)
    best = int(np.argmax(acc))
    return {
        "points": _points(t),
        "dataset": {"name": "digits-transfer", "n_train": 1000, "n_test": 797, "classes": 10},
        "accuracy": acc,
        "train_accuracy": _curve(t, 0.35, 0.95, rng),
        "best": {"index": best, "label": f"run@{best}", "accuracy": acc[best]},
    }


def full_kwargs(t: int = 6, **kw: Any) -> dict[str, Any]:
    return {
        "weights": make_weights(t, **kw.get("weights", {})),
        "stability": make_stability(t),
        "representations": make_representations(t),
        "transfer": make_transfer(t),
    }


# ---------------------------------------------------------------------------------------------- HTML checks


class _Page(HTMLParser):
    """Collects what the checks need: tags with their attributes, and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def images(page: str) -> list[dict[str, str | None]]:
    return [a for t, a in parse(page).tags if t == "img"]


def decode_png(src: str) -> np.ndarray:
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:40]
    raw = base64.b64decode(src.split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        return np.asarray(im)


def check_page(page: str) -> _Page:
    """What every report must be: one self-contained document, every plot a real PNG with alt text, ids unique."""
    p = parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//|file:)""", page, re.IGNORECASE)
    assert "<script" not in page.lower()
    assert not any(t in ("link", "iframe", "object", "embed") for t, _ in p.tags)
    for tag, attrs in p.tags:
        for attr in ("src", "href"):
            if attrs.get(attr) is not None:
                assert attrs[attr].startswith(("data:image/png;base64,", "#")), (tag, attrs[attr][:60])  # type: ignore[union-attr]
    ids = [a["id"] for _, a in p.tags if a.get("id")]
    assert len(ids) == len(set(ids)), ids
    for a in images(page):
        assert a.get("alt"), a
        arr = decode_png(a["src"] or "")
        assert arr.shape[0] > 50 and arr.shape[1] > 50
        assert arr.std() > 0  # not a blank canvas
    for fig_id in [a["id"] for t, a in p.tags if t == "figure"]:
        assert re.search(rf'<figure id="{re.escape(fig_id or "")}"><img [^>]+><figcaption>[^<]', page)
    return p


# ---------------------------------------------------------------------------------------------- unit tests


WHEN = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


@pytest.fixture(scope="module")
def full_page() -> str:
    return build_report(make_traj(), **full_kwargs(), title="My run", generated=WHEN)


def test_every_section(full_page: str) -> None:
    page = full_page
    p = check_page(page)
    ids = {a.get("id") for _, a in p.tags}
    for fig in (
        "fig-curves",
        "fig-module-distance",
        "fig-model-distance",
        "fig-pca",
        "fig-spectral",
        "fig-cka",
        "fig-cka-blocks",
        "fig-cka-to-final",
        "fig-zero-shot",
        "fig-transfer",
    ):
        assert fig in ids, fig
    for sec in ("summary", "stability", "curves", "weights", "representations", "transfer", "checkpoints", "flags"):
        assert sec in ids, sec
    text = " ".join(p.text)
    assert "My run" in text and "ckpt-tiny-ViT" in text and "Not in this report" not in text
    assert "loss rose 4.2x" in text and "visual.conv1" in text
    assert page.index("badge high") < page.index("badge low")  # flags sorted by confidence
    assert "until run@4" in text and "severity high" in text
    assert "Not checked: logit_scale_clamp (no logit_scale tensor)." in "".join(p.text)
    assert "straightness 0.8" in text and "2025-01-02T03:04:05Z" in text
    assert "8 of 10 blocks" in page  # per-block heat maps are a selection, and say so


def test_result_objects_with_to_dict(full_page: str) -> None:
    class Result:
        def __init__(self, d: dict[str, Any]) -> None:
            self.d = d

        def to_dict(self) -> dict[str, Any]:
            return self.d

    kw = {k: Result(v) for k, v in full_kwargs().items()}
    assert build_report(make_traj(), **kw, title="My run", generated=WHEN) == full_page  # deterministic too
    with pytest.raises(ReportError, match="weights="):
        build_report(make_traj(), weights=[1, 2])


def test_write_report(tmp_path: Path) -> None:
    out = write_report(make_traj(3, metrics=False), tmp_path / "sub" / "r.html", title="t")
    assert out == tmp_path / "sub" / "r.html"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temporary file left behind
    assert out.stat().st_mode & 0o777 == 0o644


def test_missing_sections_say_why() -> None:
    page = build_report(make_traj(metrics=False), skipped={"representations": "not an OpenCLIP run (no visual tower)"})
    p = check_page(page)
    text = " ".join(p.text)
    assert text.count("Not in this report") == 4
    assert "not an OpenCLIP run (no visual tower)" in text
    assert "analyze_weights" in text and "analyze_transfer" in text  # default reasons name the function
    assert len(images(page)) == 1  # only the metadata curves (loss, lr)
    assert 'class="pill no">weights' in page


def test_no_flags_state() -> None:
    page = build_report(make_traj(), stability=make_stability(flags=False))
    assert 'class="ok"><strong>No flags.</strong>' in page
    assert "loss_spike" in page and "id=flags" not in page
    check_page(page)


def test_no_metadata_at_all() -> None:
    traj = MemoryTrajectory([{"w": np.zeros(3, np.float32)}] * 2)
    page = build_report(traj, weights=make_weights(2, 3))
    check_page(page)
    assert "No loss, learning rate or eval metrics" in page


def test_nulls_everywhere() -> None:
    t = 5
    w = make_weights(t, 4)
    for m in w["modules"].values():
        m["dist_init"] = [None] * t
        m["norm"] = [None, 1.0, None, None, None]
    w["model"] = {
        "norm": [None] * t,
        "dist_init": [None, 1, None, 2, None],
        "dist_prev": None,
        "path_length": None,
        "displacement": None,
        "straightness": None,
    }
    w["pca"] = {
        "coords": [[None, None], [1, 2], [2, None], [3, 3], [4, 1]],
        "explained_variance_ratio": [None, 0.2],
        "method": None,
        "sketch_dim": None,
    }
    for tensor in w["tensors"].values():
        tensor["spectral"] = {"top_sv": [None] * t, "stable_rank": [None] * t, "effective_rank": [None] * t}
    r = make_representations(t)
    r["cka"]["image"] = [[None] * t for _ in range(t)]
    r["cka"]["text"] = "garbage"
    r["cka"]["blocks"] = {}
    r["zero_shot"] = {"top1": [None] * t, "top5": [0.1, None, 0.3, None, 0.5]}
    r["retrieval"] = None
    r["effective_dim"] = {"image": [None] * t}
    tr = make_transfer(t)
    tr["accuracy"] = [None] * t
    tr["best"] = None
    s = make_stability(t)
    s["flags"][0].update(index=None, label=None, confidence=None, score=None)
    traj = make_traj(t)
    traj.points[2].metadata["loss"] = {"last": {"$float": "nan"}, "avg": {"$float": "inf"}, "window": 1}
    traj.points[3].metadata["lr"] = None
    traj.points[4].metadata["metrics"] = {"clip_val_loss": None}
    page = build_report(traj, weights=w, stability=s, representations=r, transfer=tr)
    check_page(page)
    text = " ".join(parse(page).text)
    assert "distances from initialisation are all null" in text
    assert "Per-block CKA was not computed" in text
    assert "No spectral statistics" in text
    ids = {a.get("id") for _, a in parse(page).tags}
    assert "fig-pca" in ids and "fig-zero-shot" in ids and "fig-transfer" in ids and "fig-module-distance" not in ids
    blob = report_json(traj, weights=w, stability=s, representations=r, transfer=tr)
    json.dumps(blob, allow_nan=False)  # valid JSON: non-finite numbers became null
    assert blob["curves"]["loss"]["last"][2] is None


def test_hostile_strings_are_escaped() -> None:
    t = 4
    traj = make_traj(t, hostile=True)
    traj.points[0].metadata["tags"] = ["<b>x</b>"]
    kwargs = {
        "weights": make_weights(t, 5, hostile=True),
        "stability": make_stability(t, hostile=True),
        "representations": make_representations(t, blocks=3, hostile=True),
        "transfer": make_transfer(t),
    }
    page = build_report(traj, **kwargs, title=HOSTILE, skipped={"transfer": HOSTILE})  # type: ignore[arg-type]
    check_page(page)  # no <script> anywhere: every string was escaped
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    text = " ".join(parse(page).text)
    assert HOSTILE in text  # shown as typed
    # "$...$" in a metric name is printed, not parsed as TeX (which would raise or change the text).
    report_json(traj, **kwargs)


def test_many_modules_are_limited_and_said() -> None:
    page = build_report(make_traj(), weights=make_weights(6, MAX_HEATMAP_MODULES + 15, spectral=False))
    check_page(page)
    assert f"shows the {MAX_HEATMAP_MODULES} modules (of {MAX_HEATMAP_MODULES + 15})" in page
    assert "The 20 of 55 modules" in page


def test_long_run_single_checkpoint_and_index_axis() -> None:
    t = 120
    traj = make_traj(t)
    check_page(
        build_report(
            traj,
            weights=make_weights(t, 6, spectral=False),
            transfer=make_transfer(t),
            representations=make_representations(t, blocks=2),
        )
    )
    one = make_traj(1)
    check_page(
        build_report(one, weights=make_weights(2, 3) | {"points": _points(1)}, stability=make_stability(1, flags=False))
    )
    # Steps out of order: curves fall back to the checkpoint index.
    traj = make_traj(4)
    page = build_report([{"label": p.label, "step": 4 - p.index, "metadata": p.metadata} for p in traj.points])
    check_page(page)
    with pytest.raises(ReportError):
        build_report([])


def test_report_json_bundles_everything() -> None:
    kw = full_kwargs()
    blob = report_json(make_traj(), **kw, skipped={"x": "y"})
    assert blob["format"] == REPORT_FORMAT and blob["run"] == "trajectory" and blob["model"] == "ckpt-tiny-ViT"
    assert blob["weights"] == json.loads(json.dumps(kw["weights"]))
    assert set(blob["curves"]["metrics"]) >= {"clip_val_loss", "image_to_text_R@1"}
    assert len(blob["curves"]["lr"]) == 2 and blob["skipped"] == {}
    assert report_json(make_traj())["skipped"]["weights"].startswith("not computed")
    json.dumps(blob, allow_nan=False)


def test_global_matplotlib_state_untouched() -> None:
    import matplotlib

    before_backend, before_rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no font or layout warnings either
        build_report(make_traj(4), weights=make_weights(4, 3), representations=make_representations(4, blocks=2))
    assert matplotlib.get_backend() == before_backend
    after = dict(matplotlib.rcParams)
    assert {k for k in before_rc if before_rc[k] != after[k]} == set()


# ---------------------------------------------------------------------------------------------- ckpt report


def ckpt(*argv: str) -> int:
    from ckptstore.cli.main import main

    return main(list(argv))


def test_cli_on_a_non_clip_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptstore.store import open_store

    store = open_store(str(tmp_path / "s"), create=True)
    rng = np.random.default_rng(0)
    w = {"fc.weight": rng.normal(size=(8, 4)).astype(np.float32), "fc.bias": np.zeros(8, np.float32)}
    for step in range(4):
        w = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in w.items()}
        store.save(
            "mlp",
            step * 10,
            {"model": w},
            metadata={"step": step * 10, "loss": {"last": 1.0 / (step + 1)}, "metrics": {"acc": 0.2 * step}},
        )
    out = tmp_path / "r.html"
    assert ckpt("report", "mlp", "-s", str(tmp_path / "s"), "-O", str(out), "--no-spectral") == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    page = out.read_text()
    check_page(page)
    assert "not an OpenCLIP model" in page  # representations and transfer: skipped, with the reason
    assert ckpt("report", "mlp", "-s", str(tmp_path / "s"), "--json", "--no-representations", "--no-transfer") == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["run"] == "mlp" and blob["weights"]["points"][0]["step"] == 0
    assert "--no-representations" in blob["skipped"]["representations"]
    assert len(blob["points"]) == 4


@pytest.mark.slow
def test_cli_on_the_demo_run(demo_report: tuple[Path, str]) -> None:
    """``ckpt report demo -O report.html`` on the demo run (the ``demo_report`` fixture runs it once; the browser
    test renders the same page)."""
    out, stdout = demo_report
    assert "demo" in stdout
    page = out.read_text()
    p = check_page(page)
    ids = {a.get("id") for _, a in p.tags}
    for fig in ("fig-curves", "fig-module-distance", "fig-pca", "fig-cka", "fig-zero-shot", "fig-transfer"):
        assert fig in ids, fig
    assert "Not in this report" not in page


def test_labels_say_what_the_numbers_are(full_page: str) -> None:
    """Issue 17: the module table shows the final norm too; the loss card says it is an epoch mean; probe-set
    retrieval is told apart from the training log's recall; no "best" star on a flat curve."""
    from matplotlib.figure import Figure

    from ckptstore.analysis.report import data as rp
    from ckptstore.analysis.report.figures import _mark_best

    assert "<th>‖W<sub>0</sub>‖</th><th>‖W<sub>T</sub>‖</th>" in full_page
    assert "final training loss" not in full_page and "training loss (mean of the last epoch)" in full_page
    assert rp._metric_family("image_to_text_R@10") == "image_to_text recall@k (training log)"
    assert "not the training log's validation recall" in full_page
    axis = rp._Axis.of([{"label": f"r@{i}", "step": i, "epoch": i} for i in range(4)])
    for y, stars in ((np.full(4, 0.25), 0), (np.array([0.1, 0.3, 0.2, 0.2]), 1)):
        ax = Figure().subplots()
        _mark_best(ax, axis, y, int(np.nanargmax(y)))
        assert sum(line.get_label().startswith("best") for line in ax.get_lines()) == stars
