"""Linear centred kernel alignment (CKA; Kornblith, Norouzi, Lee & Hinton, ICML 2019).

For representations ``X`` (``n x p``) and ``Y`` (``n x q``) of the same ``n`` inputs, with columns centred
(``Xc = H X``, ``H = I - 11^T / n``)::

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = Xc Xc^T,  L = Yc Yc^T
              = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)        (the same number, in feature space)

It is 1 for identical representations, lies in [0, 1], and is invariant to orthogonal transforms and isotropic
scaling of either side (not to arbitrary invertible linear maps), so it compares layers of different widths and
checkpoints whose units have permuted or rotated.

Numerics: everything is float64; columns are centred, then each matrix is divided by its Frobenius norm (CKA does not
change, and the products stay near 1, far from overflow); the Gram form costs ``n^2 (p + q)``, the feature form
``n p q``, and the cheaper one is used. A representation with no variance (every row equal) has no defined CKA:
the value is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ckptstore.errors import CkptStoreError

__all__ = ["CKAError", "centre", "cka_matrix", "linear_cka"]

#: Largest total size (in float64 values) of cached Gram matrices in :func:`cka_matrix` before it falls back to
#: pairwise feature-space products.
_GRAM_CACHE_VALUES = 32 * 2**20


class CKAError(CkptStoreError, ValueError):
    """Representations that CKA cannot compare: different numbers of examples, too few, or not finite."""


def _as_2d(x: Any) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim > 2:  # (n, ...) feature maps: flatten everything but the example axis, as Kornblith et al. do
        arr = arr.reshape(arr.shape[0], -1)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise CKAError(f"CKA needs an (n, d) array of n >= 2 examples, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise CKAError("CKA input holds NaN or infinity")
    return arr


def centre(x: Any) -> np.ndarray | None:
    """``x`` as float64 ``(n, d)`` with centred columns and unit Frobenius norm; None if it has no variance."""
    arr = _as_2d(x)
    scale = float(np.abs(arr).max())
    arr = arr - arr.mean(axis=0, keepdims=True)
    norm = float(np.linalg.norm(arr))
    # Relative test: rows equal up to rounding leave a residue near eps * |x| after centring, not exact zeros.
    if norm == 0.0 or norm <= 1e-12 * scale * np.sqrt(arr.size):
        return None
    return arr / norm


def _cka_centred(xc: np.ndarray | None, yc: np.ndarray | None) -> float:
    """CKA of two outputs of :func:`centre` (unit Frobenius norm, centred)."""
    if xc is None or yc is None:
        return float("nan")
    n, p = xc.shape
    q = yc.shape[1]
    if n * n * (p + q) < n * p * q + n * (p * p + q * q):
        k, ll = xc @ xc.T, yc @ yc.T  # H K H and H L H: centring the data centres the Gram matrices
        num = float(np.vdot(k, ll))
        den = float(np.linalg.norm(k) * np.linalg.norm(ll))
    else:
        num = float(np.linalg.norm(yc.T @ xc) ** 2)
        den = float(np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    if den == 0.0:
        return float("nan")
    # Cauchy-Schwarz bounds the exact value to [0, 1]; rounding can step over by an ulp.
    return min(1.0, max(0.0, num / den))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two representations of the same ``n`` inputs (rows), ``(n, p)`` and ``(n, q)``.

    Arrays or torch tensors; more than two dimensions are flattened per example. NaN if either has no variance.
    """
    xa, ya = _as_2d(x), _as_2d(y)
    if xa.shape[0] != ya.shape[0]:
        raise CKAError(f"CKA compares the same inputs: {xa.shape[0]} rows vs {ya.shape[0]}")
    return _cka_centred(centre(xa), centre(ya))


def cka_matrix(activations: Sequence[Any]) -> np.ndarray:
    """The symmetric ``T x T`` matrix of linear CKA between every pair of ``T`` representations of the same inputs.

    Each representation is centred and normalised once. When the inputs are fewer than the features, each one's
    ``n x n`` Gram matrix is formed once and every entry is one inner product of two of them (the cache is bounded;
    beyond it, entries are computed pair by pair). Diagonal entries are 1 (NaN for a representation with no variance).
    """
    xs = [centre(a) for a in activations]
    t = len(xs)
    out = np.full((t, t), np.nan)
    if t == 0:
        return out
    rows = {x.shape[0] for x in xs if x is not None}
    if len(rows) > 1:
        raise CKAError(f"CKA compares the same inputs: row counts {sorted(rows)}")
    live = [x for x in xs if x is not None]
    n = live[0].shape[0] if live else 0
    mean_d = float(np.mean([x.shape[1] for x in live])) if live else 0.0
    if live and n <= mean_d and t * n * n <= _GRAM_CACHE_VALUES:
        grams = [None if x is None else x @ x.T for x in xs]
        norms = [None if g is None else float(np.linalg.norm(g)) for g in grams]
        for i in range(t):
            for j in range(i, t):
                gi, gj, ni, nj = grams[i], grams[j], norms[i], norms[j]
                if gi is None or gj is None or not ni or not nj:
                    continue
                val = 1.0 if i == j else min(1.0, max(0.0, float(np.vdot(gi, gj)) / (ni * nj)))
                out[i, j] = out[j, i] = val
        return out
    for i in range(t):
        for j in range(i, t):
            val = (1.0 if xs[i] is not None else np.nan) if i == j else _cka_centred(xs[i], xs[j])
            out[i, j] = out[j, i] = val
    return out
