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

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ckptstore.codecs.base import ArrayCodec, TensorSpec, register
from ckptstore.codecs.planes import PARALLEL_BYTES, estimate_bits, kernels, pmap, random_sample, spans
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
        xc, yc, cols = np.ascontiguousarray(x), np.ascontiguousarray(y), x.size // rows

        def dots(lh: tuple[int, int]) -> None:  # rows are independent: any split gives the same sums
            lo, hi = lh
            a, b = xc[lo * cols : hi * cols], yc[lo * cols : hi * cols]
            kernels.f32_row_dots(a, b, hi - lo, num[lo:hi], den[lo:hi])

        cut = spans(rows, x.nbytes >= PARALLEL_BYTES)
        pmap(dots, cut, len(cut) > 1)
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

    def kernel_args(self, spec: TensorSpec) -> tuple[np.ndarray, int, int] | None:
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
        kargs = self.kernel_args(spec)
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
        kargs = self.kernel_args(spec)
        if kargs is None or kernels is None:
            return None
        prev = np.ascontiguousarray(_ref(refs, words))
        cur = np.ascontiguousarray(words)
        out = np.empty((4, words.size), dtype=np.uint8)
        cut = spans(words.size, words.nbytes >= PARALLEL_BYTES)

        def run(lh: tuple[int, int]) -> None:
            for a, b, sc, rows, mode in self._calls(kargs, *lh, spec):
                kernels.f32_delta_encode_planes(cur[a:b], prev[a:b], sc, rows, mode, *(p[a:b] for p in out))

        pmap(run, cut, len(cut) > 1)
        return out

    def span_encoder(
        self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, Callable[[int, int, list[np.ndarray]], None]] | None:
        """``(sample, fill)`` for :meth:`BytePlanesZstd.encode_chunks` when the fused C loop applies, else None:
        the residual's byte planes at ``random_sample`` and a function writing those of any element range."""
        kargs = self.kernel_args(spec)
        if kargs is None or kernels is None:
            return None
        cur = np.ascontiguousarray(words)
        prev = np.ascontiguousarray(_ref(refs, words))
        pick = random_sample(cur.size)
        picked = np.ascontiguousarray(cur[pick])
        sample = np.empty((4, picked.size), dtype=np.uint8)
        scales, rows, mode = kargs
        if mode == 2:  # each sampled element with its own row's scale: "rows" of one element
            scales = np.ascontiguousarray(scales[np.arange(pick.start, pick.stop, pick.step) // (cur.size // rows)])
            rows = picked.size
        kernels.f32_delta_encode_planes(picked, np.ascontiguousarray(prev[pick]), scales, rows, mode, *sample)

        def fill(lo: int, hi: int, planes: list[np.ndarray]) -> None:
            for a, b, sc, r, m in self._calls(kargs, lo, hi, spec):
                kernels.f32_delta_encode_planes(cur[a:b], prev[a:b], sc, r, m, *(p[a - lo : b - lo] for p in planes))

        return sample, fill

    def _calls(
        self, kargs: tuple[np.ndarray, int, int], lo: int, hi: int, spec: TensorSpec
    ) -> list[tuple[int, int, np.ndarray, int, int]]:
        """Kernel calls ``(lo, hi, scales, rows, mode)`` covering any element range: with per-row scales, whole
        rows in one call and a partial row at either end as a one-scale call with that row's scale (the same
        multiply, so the same bytes)."""
        scales, rows, mode = kargs
        if mode != 2:
            return [(lo, hi, scales, rows, mode)]
        cols = spec.size // rows
        calls = []
        pos = lo
        while pos < hi:
            row = pos // cols
            if pos % cols == 0 and hi - pos >= cols:
                end = (hi // cols) * cols
                calls.append((pos, end, scales[row : end // cols], (end - pos) // cols, 2))
            else:
                end = min(hi, (row + 1) * cols)
                calls.append((pos, end, scales[row : row + 1], 0, 1))
            pos = end
        return calls

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
        fused = self.span_decoder(spec, refs, out)
        if fused is None or len(planes) != 4:
            return None
        out, decode_span = fused
        cut = spans(spec.size, spec.size * 4 >= PARALLEL_BYTES)  # the loop releases the GIL
        pmap(lambda lh: decode_span([p[lh[0] : lh[1]] for p in planes], *lh), cut, parallel=len(cut) > 1)
        return out

    def span_decoder(
        self, spec: TensorSpec, refs: Mapping[str, np.ndarray], out: np.ndarray | None = None
    ) -> tuple[np.ndarray, Callable[[list[np.ndarray], int, int], None]] | None:
        """``(out, decode_span)`` for the fused C loop, or None when it does not apply: ``decode_span(planes, lo,
        hi)`` decodes elements ``[lo, hi)`` from their 4 byte planes into ``out[lo:hi]``, for any range (a
        payload's chunks), from any thread. ``out`` as for :meth:`decode_planes`."""
        kargs = self.kernel_args(spec)
        if kargs is None or kernels is None:
            return None
        usable = (
            out is not None
            and out.dtype == np.uint32
            and out.shape == (spec.size,)
            and out.flags.c_contiguous
            and out.flags.writeable
        )
        result = out if usable and out is not None else np.empty(spec.size, dtype=np.uint32)
        prev = np.ascontiguousarray(_ref(refs, result))

        def decode_span(planes: list[np.ndarray], lo: int, hi: int) -> None:
            for a, b, sc, rows, mode in self._calls(kargs, lo, hi, spec):
                kernels.f32_delta_decode_planes(
                    *(p[a - lo : b - lo] for p in planes), prev[a:b], sc, rows, mode, result[a:b]
                )

        return result, decode_span

    def decode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        kargs = self.kernel_args(spec)
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
        candidates: list[tuple[OrderedDelta | None, OrderedDelta, float]] = [(cls("prev"), cls("prev"), 0.0)]
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
                # judged on the sampled rows' own scales (each a whole row: the same values the full pass gives
                # them); the full pass over the tensor runs only when rowscale wins
                sampled = cls(
                    "rowscale", rows=pick.size, scales=_row_scales(_values(w, spec), _values(p, spec), pick.size)
                )
                candidates.append((None, sampled, 32.0 * rows / n))
        best: OrderedDelta | None = candidates[0][0]
        best_bits = float("inf")
        for chosen, on_sample, extra in candidates:
            bits = estimate_bits(on_sample.encode(w, spec, {"prev": p}), sample=1 << 30) + extra
            if bits < best_bits:
                best, best_bits = chosen, bits
        if best is None:
            best = cls("rowscale", rows=rows, scales=_row_scales(_values(words, spec), _values(prev, spec), rows))
        return best, best_bits


def _ref(refs: Mapping[str, np.ndarray], words: np.ndarray) -> np.ndarray:
    try:
        prev = refs["prev"]
    except KeyError:
        raise CodecError("delta codec needs the reference tensor 'prev'") from None
    if prev.shape != words.shape or prev.dtype != words.dtype:
        raise CodecError("delta reference has a different shape or dtype than the tensor")
    return prev
