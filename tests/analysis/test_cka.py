"""Linear CKA: identity, the invariances it promises, agreement with the HSIC formula written out, the matrix form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckptstore.analysis import cka as cka_mod
from ckptstore.analysis.cka import CKAError, centre, cka_matrix, linear_cka
from ckptstore.errors import CkptStoreError


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s definition, naively: HSIC(K, L) = tr(K H L H) / (n - 1)^2 with linear kernels."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, ll = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, ll) / np.sqrt(hsic(k, k) * hsic(ll, ll))


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# Shapes on both sides of n = d, so both the Gram form and the feature form are exercised.
shapes = st.tuples(st.integers(3, 40), st.integers(1, 40), st.integers(1, 40))
seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=30),
        elements=st.floats(-1e3, 1e3, allow_nan=False, width=32),
    )
)
def test_cka_of_a_representation_with_itself_is_one(x: np.ndarray) -> None:
    value = linear_cka(x, x)
    if centre(x) is None:  # every row equal: no variance, no defined CKA
        assert np.isnan(value)
    else:
        assert value == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.floats(1e-4, 1e4), st.floats(1e-4, 1e4))
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(
    shape: tuple[int, int, int], seed: int, a: float, b: float
) -> None:
    n, p, q = shape
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, p)), rng.standard_normal((n, q))
    base = linear_cka(x, y)
    moved = linear_cka(a * x @ random_orthogonal(p, rng), b * y @ random_orthogonal(q, rng))
    assert moved == pytest.approx(base, abs=1e-9)
    # ... and to a translation of either side (CKA centres the features).
    assert linear_cka(x + rng.standard_normal(p) * 50, y) == pytest.approx(base, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(shapes, seeds)
def test_agrees_with_the_hsic_formula_written_out(shape: tuple[int, int, int], seed: int) -> None:
    n, p, q = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) * rng.uniform(0.1, 10, p)  # uneven feature scales: not invariant to these
    y = np.tanh(x[:, :1] @ rng.standard_normal((1, q))) + 0.3 * rng.standard_normal((n, q))
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), abs=1e-9)
    assert 0.0 <= linear_cka(x, y) <= 1.0


def test_not_invariant_to_anisotropic_scaling(rng: np.random.Generator) -> None:
    x = rng.standard_normal((50, 4))
    stretched = x * np.array([100.0, 1.0, 1.0, 1.0])
    assert linear_cka(x, stretched) < 0.99


def test_known_values(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2000, 3))
    y = rng.standard_normal((2000, 3))
    assert linear_cka(x, y) < 0.02  # independent representations
    assert linear_cka(x, np.hstack([x, np.zeros((2000, 2))])) == pytest.approx(1.0)  # dead units change nothing


def test_torch_tensors_and_feature_maps_are_flattened(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((12, 3, 4, 4)).astype(np.float32)
    flat = x.reshape(12, -1)
    y = rng.standard_normal((12, 5))
    assert linear_cka(torch.from_numpy(x), y) == pytest.approx(linear_cka(flat, y), abs=1e-12)


def test_no_variance_gives_nan_and_bad_inputs_raise() -> None:
    const = np.ones((10, 3)) * 7.0
    assert np.isnan(linear_cka(const, np.arange(30.0).reshape(10, 3)))
    with pytest.raises(CKAError, match="same inputs"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(CKAError, match="n >= 2"):
        linear_cka(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(CKAError, match="NaN"):
        linear_cka(np.array([[0.0], [np.nan]]), np.array([[0.0], [1.0]]))
    err = CKAError("x")
    assert isinstance(err, CkptStoreError) and isinstance(err, ValueError)


@pytest.mark.parametrize("gram_cache", [True, False])
def test_matrix_is_the_pairwise_values(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, gram_cache: bool
) -> None:
    if not gram_cache:
        monkeypatch.setattr(cka_mod, "_GRAM_CACHE_VALUES", 0)
    base = rng.standard_normal((20, 30))  # n < d: the Gram path when the cache is allowed
    acts = [base + s * rng.standard_normal((20, 30)) for s in (0.0, 0.3, 1.0, 3.0)]
    acts.append(np.full((20, 30), 2.0))  # a dead representation: NaN row and column
    mat = cka_matrix(acts)
    assert mat.shape == (5, 5)
    np.testing.assert_array_equal(mat, mat.T)
    for i in range(4):
        assert mat[i, i] == 1.0
        for j in range(4):
            assert mat[i, j] == pytest.approx(reference_cka(acts[i], acts[j]), abs=1e-9)
    assert np.isnan(mat[4]).all() and np.isnan(mat[:, 4]).all()
    # Farther from the first representation, lower CKA with it.
    assert mat[0, 1] > mat[0, 2] > mat[0, 3]


def test_matrix_wide_n(rng: np.random.Generator) -> None:
    acts = [rng.standard_normal((300, 4)) for _ in range(3)]  # n > d: the feature-space path
    mat = cka_matrix(acts)
    assert mat[0, 1] == pytest.approx(reference_cka(acts[0], acts[1]), abs=1e-9)
    assert cka_matrix([]).shape == (0, 0)
    with pytest.raises(CKAError):
        cka_matrix([np.zeros((4, 2)) + np.arange(4)[:, None], rng.standard_normal((5, 2))])
