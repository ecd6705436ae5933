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
from ckptstore.codecs.planes import PARALLEL_BYTES, estimate_bits, kernels, pmap
from ckptstore.errors import CodecError

PREDICTORS = ("prev", "scale", "rowscale")
# rowscale is tried for 2-D (and higher) tensors whose rows have at least this many elements
_ROWSCALE_MIN_COLS = 16


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


def _scaled(prev: np.ndarray, spec: TensorSpec, a: float | np.ndarray) -> np.ndarray:
    """``a * prev`` rounded to the tensor's dtype, as words; ``a`` is one scale, or one float32 scale per row."""
    rows = a.size if isinstance(a, np.ndarray) else 0

    def mul(values: np.ndarray, ftype: type) -> np.ndarray:
        if rows:
            scales: np.ndarray = np.asarray(a, dtype=np.float32).astype(ftype)
            return np.multiply(values.reshape(rows, -1), scales[:, None]).reshape(-1)
        return np.multiply(values, ftype(a))

    if spec.dtype == "float32":
        return mul(prev.view("<f4"), np.float32).view(prev.dtype)
    if spec.dtype == "float64":
        return mul(prev.view("<f8"), np.float64).view(prev.dtype)
    if spec.dtype == "float16":
        return mul(prev.view("<f2"), np.float16).view(prev.dtype)
    if spec.dtype == "bfloat16":
        f = mul((prev.astype(np.uint32) << 16).view("<f4"), np.float32)
        b = f.view(np.uint32)
        b += 0x7FFF + ((b >> 16) & 1)  # round to nearest even; deterministic for every input, NaN included
        return (b >> 16).astype(np.uint16)
    raise CodecError(f"scale predictor does not support {spec.dtype}")


def _row_scales(x: np.ndarray, y: np.ndarray, rows: int) -> np.ndarray:
    """Least-squares scale per row (x ≈ s * y), float32; 1 where a row is all zero or not finite."""
    if kernels is not None and x.dtype == np.float32 and y.dtype == np.float32:
        num, den = np.empty(rows), np.empty(rows)
        kernels.f32_row_dots(np.ascontiguousarray(x), np.ascontiguousarray(y), rows, num, den)
    else:
        xs, ys = x.reshape(rows, -1), y.reshape(rows, -1)
        with np.errstate(all="ignore"):
            # float64 sums: the scale must be right to ~1e-8 for the prediction to land within a few ULPs
            num = np.einsum("ij,ij->i", xs, ys, dtype=np.float64)
            den = np.einsum("ij,ij->i", ys, ys, dtype=np.float64)
    with np.errstate(all="ignore"):
        s = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    s[~np.isfinite(s)] = 1.0
    return s.astype(np.float32)


def _values(words: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.dtype == "bfloat16":
        return (words.astype(np.uint32) << 16).view("<f4")
    return words.view(f"<f{spec.dt.itemsize}")


@register
class OrderedDelta(ArrayCodec):
    """Residual against a prediction from the same tensor in the reference checkpoint (role ``prev``)."""

    name = "delta"

    def __init__(
        self,
        predictor: str = "prev",
        scale: str | None = None,
        rows: int | None = None,
        side: bool = False,
        scales: np.ndarray | None = None,
    ) -> None:
        if predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {predictor!r}")
        if predictor == "scale" and scale is None:
            raise ValueError("scale predictor needs a scale")
        if scale is not None:
            if not isinstance(scale, str):
                raise ValueError(f"scale must be a float.hex() string, got {type(scale).__name__}")
            float.fromhex(scale)  # ValueError for malformed text; from_record turns it into CodecError
        if predictor == "rowscale" and (not isinstance(rows, int) or rows < 1):
            raise ValueError("rowscale predictor needs rows >= 1")
        self.predictor = predictor
        self.scale = scale  # float.hex(), so the value round-trips exactly through JSON
        self.rows = rows
        self.scales: np.ndarray | None = scales  # rowscale: float32 per row, carried in the payload's side data

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"predictor": self.predictor}
        if self.scale is not None:
            cfg["scale"] = self.scale
        if self.predictor == "rowscale":
            cfg["rows"] = self.rows
            cfg["side"] = True
        return cfg

    def side_bytes(self) -> bytes:
        if self.predictor != "rowscale" or self.scales is None:
            return b""
        return self.scales.astype("<f4").tobytes()

    def load_side(self, data: bytes) -> None:
        if self.predictor == "rowscale":
            if len(data) != 4 * int(self.rows or 0):
                raise CodecError(f"rowscale side data is {len(data)} bytes, expected {4 * int(self.rows or 0)}")
            self.scales = np.frombuffer(data, dtype="<f4").copy()

    def ref_roles(self) -> tuple[str, ...]:
        return ("prev",)

    def _prediction(self, prev: np.ndarray, spec: TensorSpec) -> np.ndarray:
        if self.predictor == "scale" and self.scale is not None:
            prev = _scaled(prev, spec, float.fromhex(self.scale))
        elif self.predictor == "rowscale":
            if self.scales is None or self.scales.size != self.rows or prev.size % max(1, self.scales.size):
                raise CodecError("rowscale predictor has no (or mismatched) per-row scales")
            prev = _scaled(prev, spec, self.scales)
        return to_ordered(prev) if _is_float(spec) else prev

    def _kernel_args(self, spec: TensorSpec) -> tuple[np.ndarray, int, int] | None:
        """Arguments of the fused C loop, when it applies (float32; same bytes as the numpy path)."""
        if kernels is None or spec.dtype != "float32":
            return None
        if self.predictor == "prev":
            return np.zeros(1, np.float32), 0, 0
        if self.predictor == "scale" and self.scale is not None:
            return np.array([float.fromhex(self.scale)], np.float32), 0, 1
        if self.scales is None:
            raise CodecError("rowscale predictor has no per-row scales")
        return np.ascontiguousarray(self.scales, np.float32), int(self.rows or 0), 2

    def encode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        kargs = self._kernel_args(spec)
        if kargs is not None and kernels is not None:
            prev = np.ascontiguousarray(_ref(refs, words))
            out = np.empty_like(words)
            kernels.f32_delta_encode(np.ascontiguousarray(words), prev, kargs[0], kargs[1], kargs[2], out)
            return out
        pred = self._prediction(_ref(refs, words), spec)
        cur = to_ordered(words) if _is_float(spec) else words
        d = np.subtract(cur, pred)
        return zigzag(d)

    def encode_planes(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The residual already split into byte planes ((4, n) uint8), when the fused C loop applies; else None.
        Same bytes as ``split_planes(self.encode(...))``, one pass instead of two."""
        kargs = self._kernel_args(spec)
        if kargs is None or kernels is None:
            return None
        prev = np.ascontiguousarray(_ref(refs, words))
        out = np.empty((4, words.size), dtype=np.uint8)
        kernels.f32_delta_encode_planes(np.ascontiguousarray(words), prev, kargs[0], kargs[1], kargs[2], out)
        return out

    def decode_planes(
        self,
        planes: list[np.ndarray],
        spec: TensorSpec,
        refs: Mapping[str, np.ndarray],
        out: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Decode straight from the residual's 4 byte planes (the inverse of :meth:`encode_planes`), when the
        fused C loop applies; else None. The loop reads ``prev[i]`` before it writes ``out[i]``, so ``out`` may be
        ``prev`` itself."""
        kargs = self._kernel_args(spec)
        if kargs is None or kernels is None or len(planes) != 4:
            return None
        usable = (
            out is not None
            and out.dtype == np.uint32
            and out.shape == (spec.size,)
            and out.flags.c_contiguous
            and out.flags.writeable
        )
        if not usable:
            out = np.empty(spec.size, dtype=np.uint32)
        assert out is not None
        prev = np.ascontiguousarray(_ref(refs, out))
        scales, rows, mode = kargs
        n = spec.size
        # Large tensors decode as two halves on the two plane threads (the loop releases the GIL); per-row
        # scales cut at a row boundary.
        cols = n // rows if mode == 2 and rows > 0 else 1
        cut = (rows // 2) * cols if mode == 2 else n // 2
        spans = [(0, cut), (cut, n)] if n * 4 >= PARALLEL_BYTES and 0 < cut < n else [(0, n)]

        def run(lo_hi: tuple[int, int]) -> None:
            lo, hi = lo_hi
            sc, r = scales, rows  # the whole tensor: the kernel checks the arguments as given
            if mode == 2 and len(spans) == 2:
                sc, r = scales[lo // cols : hi // cols], (hi - lo) // cols
            kernels.f32_delta_decode_planes(*(p[lo:hi] for p in planes), prev[lo:hi], sc, r, mode, out[lo:hi])

        pmap(run, spans, parallel=len(spans) == 2)
        return out

    def decode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        kargs = self._kernel_args(spec)
        if kargs is not None and kernels is not None:
            prev = np.ascontiguousarray(_ref(refs, words))
            out = np.empty_like(words)
            kernels.f32_delta_decode(np.ascontiguousarray(words), prev, kargs[0], kargs[1], kargs[2], out)
            return out
        pred = self._prediction(_ref(refs, words), spec)
        out = unzigzag(words)
        out += pred
        return to_ordered(out) if _is_float(spec) else out

    @classmethod
    def fit(cls, words: np.ndarray, prev: np.ndarray, spec: TensorSpec) -> tuple[OrderedDelta, float]:
        """Pick the predictor that makes the residual cheapest, judged on a sample; returns (codec, bits/elem).

        Candidates: the previous value; one fitted scale (decoupled weight decay shrinks a whole tensor alike);
        one fitted scale per row, for matrices whose rows move differently (an embedding table's rows of unseen
        tokens only decay, seen ones also follow gradients). The sample is a set of whole rows so that every
        candidate is judged on the same elements; rowscale pays for its side data in the comparison.
        """
        n = words.size
        floaty = spec.dtype in ("float32", "float64", "float16", "bfloat16")
        rows = spec.shape[0] if len(spec.shape) >= 2 and floaty else 0
        cols = n // rows if rows else 0
        if rows >= 2 and cols >= _ROWSCALE_MIN_COLS:
            pick = np.unique(np.linspace(0, rows - 1, num=min(rows, max(1, (1 << 14) // cols))).astype(np.int64))
            w = np.ascontiguousarray(words.reshape(rows, cols)[pick]).reshape(-1)
            p = np.ascontiguousarray(prev.reshape(rows, cols)[pick]).reshape(-1)
        else:
            rows = 0
            step = max(1, n // (1 << 14))
            w, p = np.ascontiguousarray(words[::step]), np.ascontiguousarray(prev[::step])
        candidates: list[tuple[OrderedDelta, OrderedDelta, float]] = [(cls("prev"), cls("prev"), 0.0)]
        if floaty:
            x, y = _values(w, spec).astype(np.float64), _values(p, spec).astype(np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            yo, xo = y[ok], x[ok]
            denom = float((yo * yo).sum())  # plain sums: BLAS dot spins up threads, costly for small tensors
            if denom > 0:
                a = float(np.float32((xo * yo).sum() / denom))
                if np.isfinite(a) and a != 1.0 and a > 0:
                    c = cls("scale", float.hex(a))
                    candidates.append((c, c, 0.0))
            if rows:
                full = _row_scales(_values(words, spec), _values(prev, spec), rows)
                whole = cls("rowscale", rows=rows, scales=full)
                sampled = cls("rowscale", rows=pick.size, scales=full[pick])
                candidates.append((whole, sampled, 32.0 * rows / n))
        best, best_bits = candidates[0][0], float("inf")
        for chosen, on_sample, extra in candidates:
            bits = estimate_bits(on_sample.encode(w, spec, {"prev": p}), sample=1 << 30) + extra
            if bits < best_bits:
                best, best_bits = chosen, bits
        return best, best_bits


def _ref(refs: Mapping[str, np.ndarray], words: np.ndarray) -> np.ndarray:
    try:
        prev = refs["prev"]
    except KeyError:
        raise CodecError("delta codec needs the reference tensor 'prev'") from None
    if prev.shape != words.shape or prev.dtype != words.dtype:
        raise CodecError("delta reference has a different shape or dtype than the tensor")
    return prev
