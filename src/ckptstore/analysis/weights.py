"""Weight dynamics of a run: how far, how fast and how straight each tensor, module and the whole model moved.

:func:`analyze_weights` reads a :class:`~ckptstore.analysis.trajectory.Trajectory` name-major (one tensor through
every checkpoint, then the next) and keeps, per tensor, a handful of float64 running sums per checkpoint:

* ``sq[t] = ‖w_t‖²``, ``d0[t] = ‖w_t − w_0‖²``, ``dp[t] = ‖w_t − w_{t−1}‖²``, ``dot0[t] = ⟨w_t, w_0⟩``,
  ``dotF[t] = ⟨w_t, w_F⟩`` (``w_F`` the final checkpoint), and the count of NaN/Inf values.

Every reported number is a function of these sums, so a module's (or the whole model's) statistics are exact: the
sums of its tensors, not averages of per-tensor cosines. Memory is the trajectory's reading plus one extra copy of
the tensor being read (the first checkpoint's, held for ``dist_init``; then, in a second pass over big tensors, the
last one's for ``cos_final``) and a few fixed-size float64 chunks: see docs/analysis-dynamics.md.

The 2-D PCA projection of the whole trajectory is streamed through a count-sketch (each coordinate of a tensor
sent to one of ``sketch_dim`` buckets with a random ±1 sign, deterministic per tensor name; see :class:`_Sketch`):
the ``T × sketch_dim`` sketch preserves inner products of the centred trajectory up to ``O(1/√sketch_dim)``
relative error. When the model
has at most ``sketch_dim`` parameters the flattened weights themselves are used, and the projection is exact.

>>> dyn = analyze_weights(MemoryTrajectory([{"w": np.zeros(3)}, {"w": np.ones(3)}]))  # doctest: +SKIP
>>> dyn.model.path_length, dyn.to_dict()["modules"]["w"]["dist_init"]  # doctest: +SKIP
(1.7320508075688772, [0.0, 1.7320508075688772])
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptstore.analysis.trajectory import Point, Trajectory, TrajectoryError

__all__ = [
    "DEFAULT_SKETCH_DIM",
    "DEFAULT_SPECTRAL_MAX_DIM",
    "ModelDynamics",
    "PCAProjection",
    "Series",
    "Spectral",
    "TensorDynamics",
    "WeightDynamics",
    "analyze_weights",
    "module_of",
    "top_modules",
]

#: Buckets of the count-sketch behind the PCA projection (a power of two).
DEFAULT_SKETCH_DIM = 1 << 16
#: Spectra are computed for matrices whose smaller side is at most this (cost ~ numel × min side per checkpoint).
DEFAULT_SPECTRAL_MAX_DIM = 1024
# Elements per float64 working chunk: bounds the temporaries to a few MB whatever the tensor size.
_CHUNK = 1 << 16
# A tensor whose T copies together have at most this many elements is held whole for cos_final; a bigger one is
# read a second time instead (holding T copies of a large tensor would break the memory bound).
_HOLD_ELEMENTS = 1 << 21
# Rows per block when accumulating a matrix's Gram matrix.
_GRAM_ROWS = 4096


# ---------------------------------------------------------------------------------------------- results
def _json_float(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _json_list(a: np.ndarray) -> list[float | None]:
    return [_json_float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


@dataclass(frozen=True)
class Series:
    """The movement of a tensor, a module or the whole model: one value per checkpoint (NaN where undefined).

    ``norm`` is ‖w_t‖, ``dist_init`` ‖w_t − w_0‖, ``dist_prev`` ‖w_t − w_{t−1}‖ (0 at the first checkpoint),
    ``rel_update`` ‖w_t − w_{t−1}‖ / ‖w_{t−1}‖, ``cos_init``/``cos_final`` the cosine similarity to the first/last
    checkpoint, ``nonfinite`` the number of NaN/Inf values.
    """

    numel: int
    norm: np.ndarray
    dist_init: np.ndarray
    dist_prev: np.ndarray
    rel_update: np.ndarray
    cos_init: np.ndarray
    cos_final: np.ndarray
    nonfinite: np.ndarray

    def series_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            key: _json_list(getattr(self, key))
            for key in ("norm", "dist_init", "dist_prev", "rel_update", "cos_init", "cos_final")
        }
        out["nonfinite"] = [int(v) for v in self.nonfinite]
        out["numel"] = self.numel
        return out


@dataclass(frozen=True)
class Spectral:
    """Singular-value summary of a matrix (a conv kernel reshaped to ``out × rest``) at each checkpoint.

    ``top_sv`` σ_max; ``stable_rank`` ‖W‖_F² / σ_max²; ``effective_rank`` exp(H(p)) with p_i = σ_i / Σσ (Roy &
    Vetterli 2007). ``skipped`` says why the values are missing (matrix above the size cap).
    """

    top_sv: np.ndarray
    stable_rank: np.ndarray
    effective_rank: np.ndarray
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "top_sv": _json_list(self.top_sv),
            "stable_rank": _json_list(self.stable_rank),
            "effective_rank": _json_list(self.effective_rank),
        }
        if self.skipped:
            out["skipped"] = self.skipped
        return out


@dataclass(frozen=True)
class TensorDynamics(Series):
    name: str = ""
    module: str = ""
    dtype: str = ""
    shape: tuple[int, ...] = ()
    spectral: Spectral | None = None
    value: np.ndarray | None = None  # the value itself, for one-element tensors (logit_scale)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module, "shape": list(self.shape), "dtype": self.dtype}
        out.update(self.series_dict())
        if self.spectral is not None:
            out["spectral"] = self.spectral.to_dict()
        if self.value is not None:
            out["value"] = _json_list(self.value)
        return out


@dataclass(frozen=True)
class ModelDynamics(Series):
    @property
    def path_length(self) -> float:
        """Σ_t ‖w_t − w_{t−1}‖: how far the weights travelled (NaN when a checkpoint is not finite)."""
        return float(np.sum(self.dist_prev[1:])) if len(self.dist_prev) > 1 else 0.0

    @property
    def displacement(self) -> float:
        """‖w_F − w_0‖: how far the weights got."""
        return float(self.dist_init[-1])

    @property
    def straightness(self) -> float:
        """displacement / path length: 1 for a straight line, near 0 for a random walk (NaN if nothing moved)."""
        p = self.path_length
        return self.displacement / p if p > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = self.series_dict()
        out.update(
            path_length=_json_float(self.path_length),
            displacement=_json_float(self.displacement),
            straightness=_json_float(self.straightness),
        )
        return out


@dataclass(frozen=True)
class PCAProjection:
    """The trajectory projected on its first two principal components (rows of NaN for non-finite checkpoints)."""

    coords: np.ndarray  # T × 2
    explained_variance_ratio: np.ndarray  # 2
    method: str  # "exact" or "count-sketch"
    sketch_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "coords": [_json_list(row) for row in self.coords],
            "explained_variance_ratio": _json_list(self.explained_variance_ratio),
            "method": self.method,
            "sketch_dim": self.sketch_dim,
        }


@dataclass(frozen=True)
class WeightDynamics:
    """The result of :func:`analyze_weights`; :meth:`to_dict` is its JSON form (docs/analysis-dynamics.md)."""

    points: list[Point]
    tensors: dict[str, TensorDynamics]
    modules: dict[str, Series]
    model: ModelDynamics
    pca: PCAProjection | None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [p.as_dict() for p in self.points],
            "options": dict(self.options),
            "tensors": {n: t.to_dict() for n, t in self.tensors.items()},
            "modules": {n: m.series_dict() for n, m in self.modules.items()},
            "model": self.model.to_dict(),
            "pca": self.pca.to_dict() if self.pca is not None else None,
        }


# ---------------------------------------------------------------------------------------------- grouping
def module_of(name: str, group_depth: int | None = None) -> str:
    """The module a parameter belongs to: its name without the last component (``...attn.in_proj_weight`` →
    ``...attn``), or its first ``group_depth`` components (never the whole name) when given. A name without dots is
    its own module."""
    parts = name.split(".")
    keep = len(parts) - 1 if group_depth is None else min(group_depth, len(parts) - 1)
    return ".".join(parts[:keep]) or name


# ---------------------------------------------------------------------------------------------- sums
@dataclass
class _Sums:
    """Per-checkpoint float64 sums of one tensor, or of a group of tensors (module, model)."""

    numel: int
    sq: np.ndarray
    d0: np.ndarray
    dp: np.ndarray
    dot0: np.ndarray
    dotF: np.ndarray
    nonfinite: np.ndarray

    @classmethod
    def zeros(cls, t: int) -> _Sums:
        z = np.zeros
        return cls(0, z(t), z(t), z(t), z(t), z(t), np.zeros(t, dtype=np.int64))

    def add(self, other: _Sums) -> None:
        self.numel += other.numel
        for key in ("sq", "d0", "dp", "dot0", "dotF", "nonfinite"):
            getattr(self, key).__iadd__(getattr(other, key))

    def series(self, cls: type[Series] = Series, **extra: Any) -> Any:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            norm = np.sqrt(self.sq)
            rel = np.full_like(norm, np.nan)
            dist_prev = np.sqrt(self.dp)
            rel[1:] = np.where(norm[:-1] > 0, dist_prev[1:] / norm[:-1], np.nan)
            cos_init = np.clip(np.where(norm * norm[0] > 0, self.dot0 / (norm * norm[0]), np.nan), -1.0, 1.0)
            cos_final = np.clip(np.where(norm * norm[-1] > 0, self.dotF / (norm * norm[-1]), np.nan), -1.0, 1.0)
        return cls(
            numel=self.numel, norm=norm, dist_init=np.sqrt(self.d0), dist_prev=dist_prev, rel_update=rel,
            cos_init=cos_init, cos_final=cos_final, nonfinite=self.nonfinite.copy(), **extra,
        )  # fmt: skip


def _chunks(n: int) -> Iterator[slice]:
    for a in range(0, n, _CHUNK):
        yield slice(a, min(n, a + _CHUNK))


def _f64(a: np.ndarray, s: slice) -> np.ndarray:
    return np.asarray(a[s], dtype=np.float64)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum's own SIMD loop, not BLAS ddot: single-threaded and deterministic, and immune to the slowdown of
    # OpenBLAS's spinning threads on a busy machine (10x here). NaN/Inf propagate into the sum.
    return float(np.einsum("i,i->", a, b))


# ---------------------------------------------------------------------------------------------- sketch
class _Sketch:
    """The T × D matrix whose rows are the (sketched) flattened checkpoints, filled tensor by tensor.

    The sketch is a count-sketch whose bucket is the coordinate's position, rotated by a per-tensor offset, modulo
    ``dim``, and whose ±1 sign is random per coordinate (a PCG64 stream seeded from the tensor's name, one bit per
    coordinate, drawn once per tensor). With random signs, ⟨Sx, Sy⟩ is an unbiased estimate of ⟨x, y⟩ with variance
    about ‖x‖²‖y‖²/dim whatever the buckets, and folding a chunk costs a reshape and a sum, not a hash per value and
    checkpoint.
    """

    def __init__(self, t: int, total: int, dim: int) -> None:
        if dim < 2 or dim & (dim - 1):
            raise TrajectoryError(f"sketch_dim must be a power of two ≥ 2, got {dim}")
        self.exact = total <= dim
        self.dim = total if self.exact else dim
        self.rows = np.zeros((t, max(1, self.dim)))
        self._offset = 0  # exact: where the tensor starts; sketch: its bucket rotation
        self._next = 0
        self._signs = np.zeros(0, dtype=np.uint8)

    def start(self, name: str, numel: int) -> None:
        """Begin a tensor: exact mode places it after the previous ones; sketch mode seeds its signs from its name."""
        if self.exact:
            self._offset, self._next = self._next, self._next + numel
            return
        seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=16).digest(), "little")
        self._offset = seed % self.dim
        # PCG64's raw stream is fixed for a seed (numpy keeps bit generators stable across versions)
        self._signs = np.random.PCG64(seed).random_raw(-(-numel // 64)).view(np.uint8)

    def add(self, t: int, s: slice, values: np.ndarray) -> None:
        if self.exact:
            self.rows[t, self._offset + s.start : self._offset + s.stop] = values
            return
        # the sign bits of this chunk (chunks start at multiples of 8, so they start at a byte boundary)
        bits = np.unpackbits(self._signs[s.start // 8 : -(-s.stop // 8)], bitorder="little")[: s.stop - s.start]
        v = values * (1.0 - 2.0 * bits)  # a product, not np.negative(where=...), which is 20x slower
        row = self.rows[t]
        pos, j = (s.start + self._offset) % self.dim, 0
        while j < v.size:  # fold: add the chunk to the row in runs that wrap around its end
            take = min(self.dim - pos, v.size - j)
            row[pos : pos + take] += v[j : j + take]
            j, pos = j + take, 0

    def project(self) -> PCAProjection:
        """Centred PCA of the rows that are finite; NaN coordinates for the others."""
        t = self.rows.shape[0]
        ok = np.all(np.isfinite(self.rows), axis=1)
        coords = np.full((t, 2), np.nan)
        ratio = np.full(2, np.nan)
        method = "exact" if self.exact else "count-sketch"
        if ok.sum() >= 1:
            x = self.rows[ok] - self.rows[ok].mean(axis=0)
            # an SVD of the centred (finite T) × D matrix itself: eigenvalues of its Gram matrix would put a
            # rounding error of 1e-16·σ_max² under every small singular value, i.e. 1e-8·σ_max in the coordinates
            u, sv, _ = np.linalg.svd(x, full_matrices=False)
            total = float(np.sum(sv**2))
            got = np.zeros((int(ok.sum()), 2))
            for k in range(min(2, len(sv))):
                got[:, k] = u[:, k] * sv[k]
                col = got[:, k]
                ref = col[-1] if abs(col[-1]) > 1e-12 * math.sqrt(total) else col[np.argmax(np.abs(col))]
                if ref < 0:  # a fixed sign: the last checkpoint (else the farthest) on the positive side
                    got[:, k] = -col
                ratio[k] = sv[k] ** 2 / total if total > 0 else math.nan
            if total > 0 and len(sv) < 2:
                ratio[1] = 0.0
            coords[ok] = got
        return PCAProjection(coords, ratio, method, self.dim)


# ---------------------------------------------------------------------------------------------- spectra
def _matrix(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS on one thread for the duration (threadpoolctl, when installed).

    The matrices here are small (a Gram block, an eigen-decomposition of at most ``spectral_max_dim``²) and the store
    decodes the next tensors on other threads meanwhile: a multi-threaded OpenBLAS then spins against those threads
    and, on 2 cores, made the spectra 4-7x slower (docs/benchmarks.md, "ckpt report"). The results are the same."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _singular_values(a: np.ndarray) -> np.ndarray:
    """σ of a matrix from the eigenvalues of its Gram matrix on the smaller side.

    The Gram blocks are float32 products (a float64 GEMM is ~20× slower here) summed in float64; σ_i² then carries
    an error near 1e-7·σ_max², which moves σ_max, the stable rank and the effective rank by far less than they
    change between checkpoints (tests compare against an SVD in float64)."""
    m = _matrix(a)
    if m.shape[0] < m.shape[1]:
        m = m.T
    n = m.shape[1]
    g = np.zeros((n, n))
    for r in range(0, m.shape[0], _GRAM_ROWS):
        block = np.asarray(m[r : r + _GRAM_ROWS], dtype=np.float32)
        g += (block.T @ block).astype(np.float64)
    return np.sqrt(np.clip(np.linalg.eigvalsh(g), 0.0, None))[::-1]


def _spectral_summary(a: np.ndarray) -> tuple[float, float, float]:
    sv = _singular_values(a)
    top = float(sv[0]) if len(sv) else 0.0
    if top <= 0:
        return top, math.nan, math.nan
    stable = float(np.sum(sv.astype(np.float64) ** 2) / top**2)
    p = sv / sv.sum()
    p = p[p > 0]
    return top, stable, float(np.exp(-np.sum(p * np.log(p))))


# ---------------------------------------------------------------------------------------------- one tensor
def _tensor_pass(
    traj: Trajectory,
    name: str,
    t: int,
    sketch: _Sketch | None,
    spectral: bool,
) -> tuple[_Sums, np.ndarray | None, list[tuple[float, float, float]]]:
    """Walk one tensor through the trajectory: its sums, its values (one-element tensors) and spectra."""
    info = next(w for w in traj.weights if w.name == name)
    n = info.numel
    sums = _Sums.zeros(t)
    sums.numel = n
    value = np.full(t, np.nan) if n == 1 else None
    spectra: list[tuple[float, float, float]] = []
    hold = n * t <= _HOLD_ELEMENTS
    held: list[np.ndarray] = []
    first: np.ndarray | None = None
    prev: np.ndarray | None = None
    cur: np.ndarray | None = None
    with np.errstate(all="ignore"):
        for i, arr in enumerate(traj.iter_tensor(name)):
            cur = arr.reshape(-1)
            if first is None:
                first = cur
            if hold:
                held.append(cur)
            sq = d0 = dp = dot0 = dot_last = 0.0
            bad = 0
            for s in _chunks(n):
                c = _f64(cur, s)
                part = _dot(c, c)
                if not math.isfinite(part):
                    bad += int(c.size - np.count_nonzero(np.isfinite(c)))
                sq += part
                if prev is not None:
                    p = _f64(prev, s)
                    diff = c - p
                    dp += _dot(diff, diff)
                    if i == t - 1:  # ⟨w_{F-1}, w_F⟩ while both are at hand
                        dot_last += _dot(c, p)
                z = _f64(first, s)
                diff = c - z
                d0 += _dot(diff, diff)
                dot0 += _dot(c, z)
                if sketch is not None:
                    sketch.add(i, s, c)
            sums.sq[i], sums.d0[i], sums.dp[i], sums.dot0[i], sums.nonfinite[i] = sq, d0, dp, dot0, bad
            if value is not None:
                value[i] = float(cur[0])
            if spectral:
                spectra.append(_spectral_summary(arr) if bad == 0 else (math.nan,) * 3)
            prev = cur
        assert cur is not None and first is not None
        final = cur
        sums.dotF[t - 1] = sums.sq[t - 1]
        if t >= 2:
            sums.dotF[t - 2] = dot_last
        sums.dotF[0] = sum(_dot(_f64(first, s), _f64(final, s)) for s in _chunks(n))
        todo = range(1, t - 2)
        if hold:
            for i in todo:
                sums.dotF[i] = sum(_dot(_f64(held[i], s), _f64(final, s)) for s in _chunks(n))
        elif len(todo):
            del first, held, prev
            # a second pass holding the last checkpoint instead of the first (1 .. F-2: the rest is known)
            gen = traj.iter_tensor(name)
            try:
                for i, arr in enumerate(gen):
                    if i >= t - 2:
                        break
                    if i >= 1:
                        flat = arr.reshape(-1)
                        sums.dotF[i] = sum(_dot(_f64(flat, s), _f64(final, s)) for s in _chunks(n))
            finally:
                gen.close()  # type: ignore[attr-defined]
    return sums, value, spectra


# ---------------------------------------------------------------------------------------------- the analysis
def analyze_weights(
    traj: Trajectory,
    *,
    spectral: bool | Callable[[str], bool] = True,
    pca: bool = True,
    group_depth: int | None = None,
    group: Callable[[str], str] | None = None,
    names: Sequence[str] | None = None,
    spectral_max_dim: int = DEFAULT_SPECTRAL_MAX_DIM,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    progress: Callable[[int, int], None] | None = None,
) -> WeightDynamics:
    """Norms, distances, cosines and (for matrices) spectra of every weight through the trajectory.

    ``group_depth`` groups tensors into modules by their first D name components (default: the name without its
    last component); ``group`` maps a parameter name to its module and overrides it. ``names`` restricts the
    analysis to some tensors. ``spectral`` may be a predicate on the tensor name (spectra of some matrices only).
    ``spectral_max_dim`` caps the matrices whose spectrum is computed (by their smaller
    side); larger ones report ``null`` with a ``skipped`` note. ``progress(done, total)`` is called per tensor.
    """
    if group_depth is not None and group_depth < 1:
        raise TrajectoryError(f"group_depth must be ≥ 1, got {group_depth}")
    infos = traj.weights
    if names is not None:
        wanted = set(names)
        missing = wanted - {w.name for w in infos}
        if missing:
            hint = "Trajectory.weight_names() lists them"
            raise TrajectoryError(f"no weight tensor {sorted(missing)[0]!r}", hint=hint)
        infos = [w for w in infos if w.name in wanted]
    t = len(traj)
    to_module = group or (lambda n: module_of(n, group_depth))
    sketch = _Sketch(t, sum(w.numel for w in infos), sketch_dim) if pca else None
    tensors: dict[str, TensorDynamics] = {}
    module_sums: dict[str, _Sums] = {}
    model_sums = _Sums.zeros(t)
    with one_blas_thread():  # the same numbers, without OpenBLAS spinning against the decoder threads
        for done, info in enumerate(infos):
            if sketch is not None:
                sketch.start(info.name, info.numel)
            is_matrix = len(info.shape) >= 2 and info.numel > 0
            small_side = min(info.shape[0], info.numel // max(1, info.shape[0])) if is_matrix else 0
            wants = spectral(info.name) if callable(spectral) else spectral
            do_spectral = wants and is_matrix and small_side <= spectral_max_dim
            sums, value, spectra = _tensor_pass(traj, info.name, t, sketch, do_spectral)
            spec: Spectral | None = None
            if do_spectral:
                arr = np.array(spectra, dtype=np.float64).reshape(t, 3)
                spec = Spectral(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy())
            elif wants and is_matrix:
                nan = np.full(t, np.nan)
                spec = Spectral(nan, nan.copy(), nan.copy(), f"smaller side {small_side} > spectral_max_dim "
                                f"{spectral_max_dim}")  # fmt: skip
            module = to_module(info.name)
            tensors[info.name] = sums.series(
                TensorDynamics, name=info.name, module=module, dtype=info.dtype, shape=info.shape, spectral=spec,
                value=value,
            )  # fmt: skip
            module_sums.setdefault(module, _Sums.zeros(t)).add(sums)
            model_sums.add(sums)
            if progress is not None:
                progress(done + 1, len(infos))
    options = {
        "spectral": spectral if isinstance(spectral, bool) else "some",
        "spectral_max_dim": spectral_max_dim,
        "group_depth": group_depth,
        "sketch_dim": sketch_dim,
    }
    return WeightDynamics(
        points=list(traj.points),
        tensors=tensors,
        modules={m: s.series() for m, s in module_sums.items()},
        model=model_sums.series(ModelDynamics),
        pca=sketch.project() if sketch is not None else None,
        options=options,
    )


def top_modules(dyn: WeightDynamics | Mapping[str, Any], n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` modules that moved most from the first checkpoint at the last one *relative to their first norm*
    (‖W_T − W₀‖ / ‖W₀‖), largest first, with that ratio; modules whose first norm is 0 come last. The same ranking
    as the report's module table, so the CLI and the page name the same modules."""
    mods = dyn.to_dict()["modules"] if isinstance(dyn, WeightDynamics) else dyn["modules"]
    rows = []
    for m, s in mods.items():
        dist, norm = s["dist_init"], s["norm"]
        if not dist or dist[-1] is None:
            continue
        first = norm[0] if norm else None
        rel = dist[-1] / first if isinstance(first, int | float) and math.isfinite(first) and first > 0 else math.nan
        rows.append((m, rel))
    return sorted(rows, key=lambda r: -r[1] if math.isfinite(r[1]) else math.inf)[:n]
