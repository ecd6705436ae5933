"""The delta codec: code a tensor as its integer distance from a prediction made from the previous checkpoint.

Floats are first mapped to *ordered integers* (sign-magnitude bit patterns → two's complement order), so that the
difference of two nearby floats is a small integer — their distance in units in the last place (ULPs) — whatever
their exponents. The difference is zigzag-coded (small magnitudes → small unsigned words, whose high byte planes
are then nearly constant) and handed to the byte-plane coder. Integers and bools use the plain wrapping difference.

The prediction is the previous value (``prev``) or the previous value times one fitted scale per tensor
(``scale``): decoupled weight decay shrinks every weight by the same factor each step, so a fitted scale removes
that common motion and leaves only the gradient-driven part. Predictions only need to be *deterministic*: the
residual is exact, so any prediction decodes bit-exactly. They use IEEE-exact numpy operations only (one multiply
in the tensor's own precision; bfloat16 via float32 with explicit round-to-nearest-even), never transcendental
functions whose results vary across platforms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptstore.codecs.base import ArrayCodec, TensorSpec, register
from ckptstore.codecs.planes import estimate_bits
from ckptstore.errors import CodecError

PREDICTORS = ("prev", "scale")


def to_ordered(words: np.ndarray) -> np.ndarray:
    """Float bit patterns → integers in the same order as the floats (an involution: apply twice = identity)."""
    bits = words.dtype.itemsize * 8
    signed = words.view(f"<i{words.dtype.itemsize}")
    mask = signed >> (bits - 1)
    mask &= np.array((1 << (bits - 1)) - 1, dtype=signed.dtype)
    return np.bitwise_xor(signed, mask).view(words.dtype)


def zigzag(d: np.ndarray) -> np.ndarray:
    bits = d.dtype.itemsize * 8
    signed = d.view(f"<i{d.dtype.itemsize}")
    out = np.left_shift(d, 1)
    out ^= (signed >> (bits - 1)).view(d.dtype)
    return out


def unzigzag(z: np.ndarray) -> np.ndarray:
    low = (z & 1).view(f"<i{z.dtype.itemsize}")
    out = np.right_shift(z, 1)
    out ^= np.negative(low).view(z.dtype)
    return out


def _is_float(spec: TensorSpec) -> bool:
    return spec.dt.kind in ("float", "float8")


def _scaled(prev: np.ndarray, spec: TensorSpec, a: float) -> np.ndarray:
    """``a * prev`` rounded to the tensor's dtype, as words."""
    if spec.dtype == "float32":
        return (prev.view("<f4") * np.float32(a)).view(prev.dtype)
    if spec.dtype == "float64":
        return (prev.view("<f8") * np.float64(a)).view(prev.dtype)
    if spec.dtype == "float16":
        return (prev.view("<f2") * np.float16(a)).view(prev.dtype)
    if spec.dtype == "bfloat16":
        f = (prev.astype(np.uint32) << 16).view("<f4") * np.float32(a)
        b = f.view(np.uint32)
        b += 0x7FFF + ((b >> 16) & 1)  # round to nearest even; deterministic for every input, NaN included
        return (b >> 16).astype(np.uint16)
    raise CodecError(f"scale predictor does not support {spec.dtype}")


def _values(words: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.dtype == "bfloat16":
        return (words.astype(np.uint32) << 16).view("<f4")
    return words.view(f"<f{spec.dt.itemsize}")


@register
class OrderedDelta(ArrayCodec):
    """Residual against a prediction from the same tensor in the reference checkpoint (role ``prev``)."""

    name = "delta"

    def __init__(self, predictor: str = "prev", scale: str | None = None) -> None:
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}")
        if predictor == "scale" and scale is None:
            raise ValueError("scale predictor needs a scale")
        self.predictor = predictor
        self.scale = scale  # float.hex(), so the value round-trips exactly through JSON

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"predictor": self.predictor}
        if self.scale is not None:
            cfg["scale"] = self.scale
        return cfg

    def ref_roles(self) -> tuple[str, ...]:
        return ("prev",)

    def _prediction(self, prev: np.ndarray, spec: TensorSpec) -> np.ndarray:
        if self.predictor == "scale" and self.scale is not None:
            prev = _scaled(prev, spec, float.fromhex(self.scale))
        return to_ordered(prev) if _is_float(spec) else prev

    def encode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        pred = self._prediction(_ref(refs, words), spec)
        cur = to_ordered(words) if _is_float(spec) else words
        d = np.subtract(cur, pred)
        return zigzag(d)

    def decode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        pred = self._prediction(_ref(refs, words), spec)
        out = unzigzag(words)
        out += pred
        return to_ordered(out) if _is_float(spec) else out

    @classmethod
    def fit(cls, words: np.ndarray, prev: np.ndarray, spec: TensorSpec) -> tuple[OrderedDelta, float]:
        """Pick the predictor that makes the residual cheapest, judged on a sample; returns (codec, bits/elem)."""
        n = words.size
        step = max(1, n // (1 << 16))
        w, p = np.ascontiguousarray(words[::step]), np.ascontiguousarray(prev[::step])
        candidates = [cls("prev")]
        if spec.dtype in ("float32", "float64", "float16", "bfloat16"):
            x, y = _values(w, spec).astype(np.float64), _values(p, spec).astype(np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            yo, xo = y[ok], x[ok]
            denom = float((yo * yo).sum())  # plain sums: BLAS dot spins up threads, costly for small tensors
            if denom > 0:
                a = float(np.float32((xo * yo).sum() / denom))
                if np.isfinite(a) and a != 1.0 and a > 0:
                    candidates.append(cls("scale", float.hex(a)))
        best, best_bits = candidates[0], float("inf")
        for c in candidates:
            bits = estimate_bits(c.encode(w, spec, {"prev": p}), sample=1 << 30)
            if bits < best_bits:
                best, best_bits = c, bits
        return best, best_bits


def _ref(refs: Mapping[str, np.ndarray], words: np.ndarray) -> np.ndarray:
    try:
        prev = refs["prev"]
    except KeyError:
        raise CodecError("delta codec needs the reference tensor 'prev'") from None
    if prev.shape != words.shape or prev.dtype != words.dtype:
        raise CodecError("delta reference has a different shape or dtype than the tensor")
    return prev
