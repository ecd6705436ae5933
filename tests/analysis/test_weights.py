"""Weight dynamics (ckptstore.analysis.weights): closed-form trajectories, module sums, PCA, the sketch, spectra,
non-finite weights, and the same numbers from a store run as from its .pt files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.analysis import weights as wmod
from ckptstore.analysis.trajectory import FileTrajectory, MemoryTrajectory, StoreTrajectory, TrajectoryError
from ckptstore.analysis.weights import analyze_weights, module_of, top_modules


def strict_json(d: dict[str, Any]) -> Any:
    """The JSON round trip, refusing NaN/Inf (what a browser or jq would)."""
    return json.loads(json.dumps(d, allow_nan=False))


def line_run(t: int = 6) -> tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    """w_t = w_0 + t·d with ⟨w_0, d⟩ = 0, split over two tensors of one module and a third of another."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=20)
    d = rng.normal(size=20)
    d -= (d @ w0) / (w0 @ w0) * w0  # orthogonal to w0
    states = []
    for k in range(t):
        w = w0 + k * d
        states.append({"blk.a.weight": w[:12].reshape(3, 4), "blk.a.bias": w[12:16], "blk.b.weight": w[16:]})
    return states, w0, d


# ---------------------------------------------------------------------------------------------- closed form
def test_straight_line_closed_form() -> None:
    t = 6
    states, w0, d = line_run(t)
    dyn = analyze_weights(MemoryTrajectory(states))
    n0, nd = float(np.linalg.norm(w0)), float(np.linalg.norm(d))
    ks = np.arange(t)
    norm = np.sqrt(n0**2 + ks**2 * nd**2)
    m = dyn.model
    np.testing.assert_allclose(m.norm, norm, rtol=1e-12)
    np.testing.assert_allclose(m.dist_init, ks * nd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.dist_prev, [0.0] + [nd] * (t - 1), rtol=1e-12)
    np.testing.assert_allclose(m.cos_init, n0 / norm, rtol=1e-12)
    np.testing.assert_allclose(m.cos_final, (n0**2 + ks * (t - 1) * nd**2) / (norm * norm[-1]), rtol=1e-12)
    np.testing.assert_allclose(m.rel_update[1:], nd / norm[:-1], rtol=1e-12)
    assert math.isnan(m.rel_update[0])
    assert m.path_length == pytest.approx((t - 1) * nd, rel=1e-12)
    assert m.displacement == pytest.approx((t - 1) * nd, rel=1e-12)
    assert m.straightness == pytest.approx(1.0, rel=1e-12)
    out = strict_json(dyn.to_dict())
    assert out["model"]["straightness"] == pytest.approx(1.0)
    assert out["tensors"]["blk.a.weight"]["rel_update"][0] is None
    assert out["tensors"]["blk.a.weight"]["dist_prev"][0] == 0.0
    assert out["pca"]["method"] == "exact"
    # a straight line is one principal component
    assert out["pca"]["explained_variance_ratio"][0] == pytest.approx(1.0)
    coords = np.array(out["pca"]["coords"])
    np.testing.assert_allclose(np.abs(np.diff(coords[:, 0])), nd, rtol=1e-9)
    np.testing.assert_allclose(coords[:, 1], 0.0, atol=1e-9)


def test_polygon_path_length_and_pca_recovers_the_plane() -> None:
    """The corners of a square in a random plane: path 3 sides, displacement 1 side, PCA gives the square back."""
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(30, 2)))
    u, v = q[:, 0], q[:, 1]
    centre = rng.normal(size=30) * 5
    r = 2.0
    angles = np.deg2rad([0, 90, 180, 270])
    pts = [centre + r * (math.cos(a) * u + math.sin(a) * v) for a in angles]
    states = [{"x.w": p[:10], "y.w": p[10:].reshape(4, 5)} for p in pts]
    dyn = analyze_weights(MemoryTrajectory(states))
    side = r * math.sqrt(2)
    assert dyn.model.path_length == pytest.approx(3 * side, rel=1e-12)
    assert dyn.model.displacement == pytest.approx(side, rel=1e-12)
    assert dyn.model.straightness == pytest.approx(1 / 3, rel=1e-12)
    pca = dyn.pca
    assert pca is not None and pca.method == "exact" and pca.sketch_dim == 30
    np.testing.assert_allclose(pca.explained_variance_ratio, [0.5, 0.5], atol=1e-9)
    # the projection is an isometry of the planar trajectory: every pairwise distance is kept
    true = np.array([[math.cos(a), math.sin(a)] for a in angles]) * r
    got = pca.coords
    for i in range(4):
        for j in range(4):
            assert np.linalg.norm(got[i] - got[j]) == pytest.approx(np.linalg.norm(true[i] - true[j]), abs=1e-9)
    np.testing.assert_allclose(got.mean(axis=0), 0.0, atol=1e-9)


def test_module_aggregates_are_exact_sums_not_averages() -> None:
    """A module's numbers equal those of one tensor holding all its parameters."""
    rng = np.random.default_rng(3)
    t = 5
    a = [rng.normal(size=(6, 4)) * (1 + k) for k in range(t)]  # different scales: averaging cosines would differ
    b = [rng.normal(size=50) * 0.1 + k for k in range(t)]
    split = analyze_weights(MemoryTrajectory([{"m.a": a[k], "m.b": b[k]} for k in range(t)]), pca=False)
    whole = analyze_weights(MemoryTrajectory([{"m.all": np.r_[a[k].ravel(), b[k]]} for k in range(t)]), pca=False)
    got, want = split.modules["m"], whole.tensors["m.all"]
    for key in ("norm", "dist_init", "dist_prev", "rel_update", "cos_init", "cos_final"):
        np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=1e-12, err_msg=key)
    assert got.numel == 74
    naive = (split.tensors["m.a"].cos_init + split.tensors["m.b"].cos_init) / 2
    assert not np.allclose(naive[1:], got.cos_init[1:])


def test_grouping() -> None:
    name = "visual.transformer.resblocks.3.attn.in_proj_weight"
    assert module_of(name) == "visual.transformer.resblocks.3.attn"
    assert module_of(name, 4) == "visual.transformer.resblocks.3"
    assert module_of("visual.conv1.weight", 4) == "visual.conv1"
    assert module_of("logit_scale") == "logit_scale"
    states = [{"a.b.c.w": np.ones(2) * k, "a.b.d.w": np.ones(3), "top": np.ones(1)} for k in range(3)]
    dyn = analyze_weights(MemoryTrajectory(states), group_depth=2)
    assert set(dyn.modules) == {"a.b", "top"}
    dyn = analyze_weights(MemoryTrajectory(states), group=lambda n: n[0])
    assert set(dyn.modules) == {"a", "t"}
    assert [m for m, _ in top_modules(dyn)] == ["a", "t"]  # "t" never moves
    moved = [{"big": np.full(4, 100.0) + k, "small": np.full(4, 1.0) + 0.5 * k} for k in range(2)]
    assert [m for m, _ in top_modules(analyze_weights(MemoryTrajectory(moved)))] == ["small", "big"]
    with pytest.raises(TrajectoryError):
        analyze_weights(MemoryTrajectory(states), group_depth=0)
    with pytest.raises(TrajectoryError, match="no weight tensor"):
        analyze_weights(MemoryTrajectory(states), names=["nope"])
    assert set(analyze_weights(MemoryTrajectory(states), names=["top"]).tensors) == {"top"}


# ---------------------------------------------------------------------------------------------- PCA and sketch
def test_count_sketch_agrees_with_exact() -> None:
    """A drifting, wiggling trajectory of 300k parameters: the 2^14-bucket sketch gives the exact projection."""
    rng = np.random.default_rng(4)
    t, sizes = 10, [(200, 500), (100_000,), (100_000,), (1,)]
    total = sum(int(np.prod(s)) for s in sizes)
    drift = rng.normal(size=total)
    wiggle = rng.normal(size=total)
    base = rng.normal(size=total) * 3
    flat = [base + k * drift + 2.0 * math.sin(k) * wiggle + 0.05 * rng.normal(size=total) for k in range(t)]

    def split(x: np.ndarray) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for i, s in enumerate(sizes):
            n = int(np.prod(s))
            out[f"t{i}.w"] = x[at : at + n].reshape(s)
            at += n
        return out

    traj = MemoryTrajectory([split(x) for x in flat])
    exact = analyze_weights(traj, spectral=False, sketch_dim=1 << 19).pca
    sketch = analyze_weights(traj, spectral=False, sketch_dim=1 << 14).pca
    assert exact is not None and sketch is not None
    assert exact.method == "exact" and sketch.method == "count-sketch" and sketch.sketch_dim == 1 << 14
    scale = np.abs(exact.coords).max(axis=0)
    err = np.abs(sketch.coords - exact.coords).max(axis=0) / scale
    assert err.max() < 0.05, err
    np.testing.assert_allclose(sketch.explained_variance_ratio, exact.explained_variance_ratio, atol=0.02)
    # and the sketch is deterministic (the same hashes every time, from the tensor names)
    again = analyze_weights(traj, spectral=False, sketch_dim=1 << 14).pca
    assert again is not None
    np.testing.assert_array_equal(again.coords, sketch.coords)
    with pytest.raises(TrajectoryError, match="power of two"):
        analyze_weights(traj, sketch_dim=1000)


def test_short_trajectories() -> None:
    one = analyze_weights(MemoryTrajectory([{"w": np.ones((2, 2))}]))
    d = strict_json(one.to_dict())
    assert d["model"]["path_length"] == 0.0 and d["model"]["straightness"] is None
    assert d["pca"]["coords"] == [[0.0, 0.0]] and d["pca"]["explained_variance_ratio"] == [None, None]
    assert d["tensors"]["w"]["cos_final"] == [1.0]
    two = analyze_weights(MemoryTrajectory([{"w": np.zeros(3)}, {"w": np.ones(3)}]))
    d = strict_json(two.to_dict())
    assert d["modules"]["w"]["dist_init"] == [0.0, pytest.approx(math.sqrt(3))]
    assert d["modules"]["w"]["cos_init"] == [None, None]  # cosine with a zero vector is undefined
    assert d["pca"]["explained_variance_ratio"] == [pytest.approx(1.0), pytest.approx(0.0)]


# ---------------------------------------------------------------------------------------------- spectra
def test_spectral_summary_matches_float64_svd() -> None:
    rng = np.random.default_rng(5)
    t = 3
    states = [
        {
            "lin.weight": rng.normal(size=(40, 12)) @ np.diag(np.linspace(3, 0.1, 12)),
            "conv.weight": rng.normal(size=(8, 3, 3, 3)),
            "tall.weight": rng.normal(size=(9000, 6)),  # more rows than one Gram block
            "bias": rng.normal(size=12),
        }
        for _ in range(t)
    ]
    dyn = analyze_weights(MemoryTrajectory(states), pca=False)
    assert dyn.tensors["bias"].spectral is None
    for name in ("lin.weight", "conv.weight", "tall.weight"):
        spec = dyn.tensors[name].spectral
        assert spec is not None and spec.skipped is None
        for k in range(t):
            m = states[k][name].reshape(states[k][name].shape[0], -1)
            sv = np.linalg.svd(m, compute_uv=False)
            p = sv / sv.sum()
            assert spec.top_sv[k] == pytest.approx(sv[0], rel=1e-5)
            assert spec.stable_rank[k] == pytest.approx(np.sum(sv**2) / sv[0] ** 2, rel=1e-5)
            assert spec.effective_rank[k] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
    capped = analyze_weights(MemoryTrajectory(states), pca=False, spectral_max_dim=8)
    spec = capped.tensors["lin.weight"].spectral
    assert spec is not None and spec.skipped and "12 > spectral_max_dim 8" in spec.skipped
    assert strict_json(capped.to_dict())["tensors"]["lin.weight"]["spectral"]["top_sv"] == [None] * t
    some = analyze_weights(MemoryTrajectory(states), pca=False, spectral=lambda n: n.startswith("conv"))
    assert some.tensors["conv.weight"].spectral is not None and some.tensors["lin.weight"].spectral is None
    assert analyze_weights(MemoryTrajectory(states), spectral=False).tensors["lin.weight"].spectral is None


# ---------------------------------------------------------------------------------------------- robustness
def test_nonfinite_tensors_do_not_crash_and_become_null() -> None:
    rng = np.random.default_rng(6)
    states = [{"a.w": rng.normal(size=(4, 4)), "b.w": rng.normal(size=5)} for _ in range(4)]
    states[2]["a.w"][1, 1] = np.nan
    states[2]["a.w"][2, 2] = np.inf
    dyn = analyze_weights(MemoryTrajectory(states))
    d = strict_json(dyn.to_dict())  # no NaN anywhere in the JSON
    a = d["tensors"]["a.w"]
    assert a["nonfinite"] == [0, 0, 2, 0]
    assert a["norm"][2] is None and a["norm"][1] is not None and a["norm"][3] is not None
    assert a["dist_prev"][2] is None and a["dist_prev"][3] is None
    assert a["spectral"]["top_sv"][2] is None and a["spectral"]["top_sv"][3] is not None
    assert d["modules"]["a"]["nonfinite"] == [0, 0, 2, 0] and d["model"]["nonfinite"] == [0, 0, 2, 0]
    assert d["modules"]["b"]["norm"][2] is not None  # the other module is unaffected
    assert d["model"]["path_length"] is None
    assert d["pca"]["coords"][2] == [None, None] and d["pca"]["coords"][3][0] is not None


def test_second_pass_gives_the_same_cos_final(monkeypatch: pytest.MonkeyPatch) -> None:
    """Big tensors are read twice (holding the last checkpoint) instead of held whole: the same numbers."""
    rng = np.random.default_rng(7)
    states = [{"w": rng.normal(size=(300, 7)), "v": rng.normal(size=1000)} for _ in range(6)]
    held = analyze_weights(MemoryTrajectory(states)).to_dict()
    monkeypatch.setattr(wmod, "_HOLD_ELEMENTS", 0)
    monkeypatch.setattr(wmod, "_CHUNK", 256)  # many chunks, and chunks that straddle the sketch and tensor ends
    streamed = analyze_weights(MemoryTrajectory(states)).to_dict()
    for name in ("w", "v"):
        np.testing.assert_allclose(streamed["tensors"][name]["cos_final"], held["tensors"][name]["cos_final"])
        np.testing.assert_allclose(streamed["tensors"][name]["dist_init"], held["tensors"][name]["dist_init"])
    np.testing.assert_allclose(streamed["pca"]["coords"], held["pca"]["coords"], atol=1e-9)


def test_low_precision_dtypes() -> None:
    torch = pytest.importorskip("torch")
    states = [
        {"h": torch.full((3, 3), 1.0 + k, dtype=torch.bfloat16), "f": np.full(4, k, np.float16)} for k in range(3)
    ]
    d = strict_json(analyze_weights(MemoryTrajectory(states)).to_dict())
    assert d["tensors"]["h"]["dtype"] == "bfloat16" and d["tensors"]["f"]["dtype"] == "float16"
    assert d["tensors"]["h"]["dist_init"] == [0.0, 3.0, 6.0]
    assert d["tensors"]["f"]["dist_prev"] == [0.0, 2.0, 2.0]
    assert "value" not in d["tensors"]["f"]


def test_scalar_values_are_reported() -> None:
    states = [{"logit_scale": np.array(2.0 + 0.5 * k, np.float32), "w": np.ones(2)} for k in range(3)]
    d = analyze_weights(MemoryTrajectory(states)).to_dict()
    assert d["tensors"]["logit_scale"]["value"] == [2.0, 2.5, 3.0]
    assert d["tensors"]["logit_scale"]["shape"] == []


def test_progress_is_reported() -> None:
    calls: list[tuple[int, int]] = []
    analyze_weights(
        MemoryTrajectory([{"a": np.ones(2), "b": np.ones(2)}] * 2), progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 2), (2, 2)]


# ---------------------------------------------------------------------------------------------- invariants
@st.composite
def trajectories(draw: st.DrawFn) -> list[dict[str, np.ndarray]]:
    t = draw(st.integers(1, 6))
    shapes = draw(st.lists(st.sampled_from([(3,), (2, 3), (4, 1, 2), (1,)]), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**32 - 1))
    step = draw(st.sampled_from([0.0, 1e-3, 1.0, 100.0]))
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=s) for s in shapes]
    out = []
    for _ in range(t):
        out.append({f"m{i % 2}.t{i}": v.copy() for i, v in enumerate(x)})
        x = [v + step * rng.normal(size=v.shape) for v in x]
    return out


@settings(max_examples=60, deadline=None)
@given(trajectories())
def test_invariants(states: list[dict[str, np.ndarray]]) -> None:
    dyn = analyze_weights(MemoryTrajectory(states))
    m = dyn.model
    assert np.all(m.dist_prev >= 0) and m.dist_prev[0] == 0 and m.dist_init[0] == 0
    assert m.path_length >= m.displacement * (1 - 1e-9) - 1e-12
    for s in [m, *dyn.modules.values(), *dyn.tensors.values()]:
        cos = np.r_[s.cos_init, s.cos_final]
        assert np.all(np.isnan(cos) | ((cos >= -1) & (cos <= 1)))
    # the model's squared norm is the sum over modules; the triangle inequality holds step by step
    np.testing.assert_allclose(m.norm**2, sum(s.norm**2 for s in dyn.modules.values()), rtol=1e-9)
    assert np.all(m.dist_init[1:] <= np.cumsum(m.dist_prev)[1:] * (1 + 1e-9) + 1e-12)
    # the exact PCA is an orthogonal projection: it never lengthens a distance
    assert dyn.pca is not None
    flat = [np.concatenate([s[k].ravel() for k in s]) for s in states]
    for i in range(len(states)):
        for j in range(i):
            assert np.linalg.norm(dyn.pca.coords[i] - dyn.pca.coords[j]) <= np.linalg.norm(flat[i] - flat[j]) + 1e-9
    strict_json(dyn.to_dict())


# ---------------------------------------------------------------------------------------------- real run
@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The shared 2-epoch tiny OpenCLIP run (trained once and cached), and a store holding it."""
    from ckptstore.demo import trajectory as tj

    pytest.importorskip("open_clip")
    import ckptstore
    from ckptstore.integrations.openclip import ingest

    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    store = ckptstore.create_store(tmp_path_factory.mktemp("weights") / "ckpt.store")
    ingest(store, [ckpts], run="tiny")
    return ckpts, store


@pytest.mark.slow
def test_store_and_files_give_the_same_numbers(real_run: tuple[Path, Any]) -> None:
    from ckptstore.analysis.stability import analyze_stability

    ckpts, store = real_run
    files = FileTrajectory([ckpts / "epoch_1.pt", ckpts / "epoch_2.pt"])
    stored = StoreTrajectory(store, "tiny")
    a, b = analyze_weights(files).to_dict(), analyze_weights(stored).to_dict()
    assert [p["label"] for p in a.pop("points")] == ["epoch_1.pt", "epoch_2.pt"]
    assert [p["label"] for p in b.pop("points")] == ["tiny@1", "tiny@2"]
    assert a == b  # identical, not approximately equal
    assert a["pca"]["method"] == "count-sketch"
    assert a["tensors"]["visual.conv1.weight"]["spectral"]["effective_rank"][0] > 10
    assert a["model"]["dist_init"][1] > 0
    sa, sb = analyze_stability(files).to_dict(), analyze_stability(stored).to_dict()
    for s in (sa, sb):
        s.pop("points")
        for f in s["flags"]:
            f.pop("label")
    assert sa == sb
    assert sa["flags"] == []  # a normal run raises nothing
