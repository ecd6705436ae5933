"""``lossy-q``: an error-bounded quantiser for the archive tier (docs/archive.md) — the one lossy codec.

An array→array codec: the floating-point values become integers (zig-zag, in words of the tensor's own width),
which the chain's bytes codec (``planes-zstd``) then packs. Two domains:

* ``linear`` (weights, Adam's first moment): ``q = rint((x - ref) / step)``, decoded ``x̂ = ref + q·step`` cast to
  the dtype. ``ref`` is the *reconstructed* previous checkpoint's tensor (role ``prev``; absent: 0), so the
  encoder always quantises against what a reader will have — closed loop, the error of one checkpoint never
  enters the next one's.
* ``log`` (Adam's second moment, ≥ 0 and spanning many decades): ``q = rint(ln x / step)``, ``x̂ = exp(q·step)``,
  coded as the difference from the previous reconstruction's ``q``.

Exact zeros of the log domain (second moments of never-updated parameters) get a reserved word. Every element
the quantiser cannot bring within the bound — NaN, ±Inf, negative values in the log domain, integers that
do not fit the word, elements the cast to the dtype pushed over — is an *exception*, stored exactly (its
original bits) in the codec's side bytes. So the bound holds for every element by construction, not on
average, and non-finite values are kept bit-exact. :func:`quantise` is the encoder (it returns the codec, the
words, the reconstruction and the largest error it observed); the registered codec is what decodes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from ckptstore.codecs.base import ArrayCodec, TensorSpec, register
from ckptstore.errors import CodecError

__all__ = ["DEFAULT_BOUNDS", "Bound", "LossyQuant", "from_float", "max_error", "quantise", "to_float"]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Bound:
    """A per-element error bound: ``abs`` (|x̂ − x| ≤ value), ``rel`` (≤ value · max|x| of the tensor) or
    ``elem`` (≤ value · |x|, element by element; the log domain's natural bound)."""

    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in ("abs", "rel", "elem") or not (self.value > 0 and math.isfinite(self.value)):
            raise CodecError(f"bad error bound {self.mode}:{self.value}", hint="abs:V, rel:V or elem:V with V > 0")

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value}


#: The default bound per tensor kind (docs/archive.md explains the choice and measures it).
DEFAULT_BOUNDS: dict[str, Bound] = {
    "weights": Bound("rel", 2e-3),
    "exp_avg": Bound("rel", 1e-2),
    "exp_avg_sq": Bound("elem", 0.05),
}


# ------------------------------------------------------------------------------------------ dtype helpers
def to_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """The exact values of a float array (``bfloat16``: its uint16 words) as float64."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return values.astype(np.float64)


def from_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 → the dtype (round to nearest even; ``bfloat16`` as uint16 words)."""
    if dtype == "bfloat16":
        with np.errstate(over="ignore", invalid="ignore"):
            bits = x.astype(np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        nan = np.isnan(x)
        out = rounded.astype(np.uint16)
        out[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)  # keep NaN a NaN
        return out
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype({"float16": np.float16, "float32": np.float32, "float64": np.float64}[dtype])


def _word(dtype: str) -> tuple[type, type, int]:
    bits = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}[dtype]
    return ({16: np.uint16, 32: np.uint32, 64: np.uint64}[bits], {16: np.int16, 32: np.int32, 64: np.int64}[bits],
            bits)  # fmt: skip


def _eps(x: np.ndarray, bound: Bound) -> float | np.ndarray:
    if bound.mode == "abs":
        return bound.value
    if bound.mode == "rel":
        fin = x[np.isfinite(x)]
        return bound.value * float(np.max(np.abs(fin))) if fin.size else 0.0
    return bound.value * np.abs(x)


def max_error(x: np.ndarray, recon: np.ndarray, bound: Bound | None = None) -> float:
    """The largest |x̂ − x| over the finite elements (with ``bound`` ``elem``: the largest |x̂ − x| / |x|)."""
    fin = np.isfinite(x)
    if not fin.any():
        return 0.0
    err = np.abs(recon[fin] - x[fin])
    if bound is not None and bound.mode == "elem":
        ax = np.abs(x[fin])
        err = np.where(ax > 0, err / np.where(ax > 0, ax, 1.0), np.where(err > 0, np.inf, 0.0))
    return float(err.max())


def _within(x: np.ndarray, recon: np.ndarray, eps: float | np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & (np.abs(recon - x) <= eps)


# ------------------------------------------------------------------------------------------ the codec
@register
class LossyQuant(ArrayCodec):
    """Decodes ``lossy-q`` objects (format §10.6). Build one with :func:`quantise`."""

    name = "lossy-q"

    def __init__(self, domain: str = "linear", step: float = 1.0, side: bool = True) -> None:
        if domain not in ("linear", "log") or not (step > 0 and math.isfinite(step)):
            raise ValueError(f"bad lossy-q config domain={domain!r} step={step!r}")
        self.domain = domain
        self.step = float(step)
        self._side = b""

    def config(self) -> dict[str, Any]:
        return {"domain": self.domain, "step": self.step, "side": True}

    def ref_roles(self) -> tuple[str, ...]:
        return ("prev",)

    def side_bytes(self) -> bytes:
        return self._side

    def load_side(self, data: bytes) -> None:
        self._side = bytes(data)

    def encode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        raise CodecError("lossy-q is written by ckptstore.codecs.lossy.quantise, not by a chain encode")

    def _ref_codes(self, ref: np.ndarray | None, n: int) -> np.ndarray:
        if ref is None:
            return np.zeros(n, np.float64)
        if self.domain == "linear":
            return np.where(np.isfinite(ref), ref, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(np.log(ref) / self.step)
        return np.where(np.isfinite(q), q, 0.0)

    def values(self, codes: np.ndarray, ref: np.ndarray | None, dtype: str) -> np.ndarray:
        """Reconstructed float64 values (before exceptions) from the signed integer codes."""
        base = self._ref_codes(ref, codes.size)
        if self.domain == "linear":
            x = base + codes.astype(np.float64) * self.step
        else:
            with np.errstate(over="ignore"):
                x = np.exp((base + codes.astype(np.float64)) * self.step)
        return to_float(from_float(x, dtype), dtype)

    def decode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray:
        uword, sword, _bits = _word(spec.dtype)
        u: np.ndarray = words.view(uword)
        codes = (u >> uword(1)).astype(sword) ^ -(u & uword(1)).astype(sword)  # zig-zag back
        prev = refs.get("prev")
        ref = to_float(_as_values(prev, spec.dtype), spec.dtype) if prev is not None else None
        out: np.ndarray = from_float(self.values(codes, ref, spec.dtype), spec.dtype).view(uword)
        if self.domain == "log":
            out[u == _zero_word(uword)] = 0  # the reserved word: exactly zero
        idx, bits = _read_side(self._side, uword)
        out[idx] = bits
        return out


def _zero_word(uword: type) -> Any:
    """The log domain's word for an exact zero (all ones; zig-zag codes stay below it)."""
    return uword(np.iinfo(uword).max)


def _as_values(words: np.ndarray, dtype: str) -> np.ndarray:
    """Stored words → an array ``to_float`` reads (bfloat16 stays uint16 words)."""
    if dtype == "bfloat16":
        return words.view(np.uint16)
    return words.view({"float16": np.float16, "float32": np.float32, "float64": np.float64}[dtype])


def _write_side(idx: np.ndarray, bits: np.ndarray) -> bytes:
    gaps = np.diff(idx.astype(np.uint64), prepend=np.uint64(0))
    z = zstandard.ZstdCompressor(level=9)
    a, b = z.compress(gaps.tobytes()), z.compress(bits.tobytes())
    return struct.pack("<QQQ", idx.size, len(a), len(b)) + a + b


def _read_side(data: bytes, uword: type) -> tuple[np.ndarray, np.ndarray]:
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, uword)
    try:
        n, la, lb = struct.unpack_from("<QQQ", data)
        d = zstandard.ZstdDecompressor()
        gaps = np.frombuffer(d.decompress(data[24 : 24 + la]), np.uint64) if n else np.zeros(0, np.uint64)
        bits: np.ndarray = np.frombuffer(d.decompress(data[24 + la : 24 + la + lb]), uword) if n else np.zeros(0, uword)
    except (struct.error, zstandard.ZstdError, ValueError):
        raise CodecError("lossy-q exception table is damaged") from None
    if gaps.size != n or bits.size != n:
        raise CodecError("lossy-q exception table is damaged")
    return np.cumsum(gaps).astype(np.int64), bits


def quantise(
    values: np.ndarray, dtype: str, bound: Bound, *, domain: str = "linear", ref: np.ndarray | None = None
) -> tuple[LossyQuant, np.ndarray, np.ndarray, dict[str, Any]]:
    """Encode one tensor within ``bound``.

    ``values``: the tensor (float16/32/64 array, or ``bfloat16`` uint16 words), flat. ``ref``: the previous
    checkpoint's *reconstructed* values as float64 (``to_float`` of what :meth:`LossyQuant.decode` gave), or
    None. Returns the codec (its config and side bytes hold the step and the exceptions), the words to store,
    the reconstruction (float64, what a reader will decode) and a record: ``bound``, ``eps`` (the absolute bound
    for ``abs``/``rel``), ``max_err`` observed, ``exceptions``.
    """
    if dtype not in FLOAT_DTYPES:
        raise CodecError(f"lossy-q codes floating-point tensors, not {dtype}")
    uword, sword, bits = _word(dtype)
    flat = np.ascontiguousarray(values).reshape(-1)
    x = to_float(flat, dtype)
    eps = _eps(x, bound)
    if domain == "linear":
        if bound.mode == "elem":
            raise CodecError("the linear domain takes an abs or rel bound", hint="elem bounds are for domain='log'")
        step = 2.0 * float(eps) if float(eps) > 0 else 1.0
    else:
        step = 2.0 * math.log1p(bound.value) if bound.mode == "elem" else 1.0
        if bound.mode != "elem":
            raise CodecError("the log domain takes an elem (relative per element) bound")
    codec = LossyQuant(domain, step)
    base = codec._ref_codes(ref, x.size)
    limit = float(2 ** (bits - 1) - 2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint((x - base) / step) if domain == "linear" else np.rint(np.log(x) / step) - base
        ok = np.isfinite(q) & (np.abs(q) <= limit)
        q = np.where(ok, q, 0.0)
    codes = q.astype(np.int64)
    recon = codec.values(codes, ref, dtype)
    zero = (x == 0) & ~np.signbit(x) if domain == "log" else np.zeros(x.size, bool)
    good = ok & _within(x, recon, eps)
    if domain == "log":
        good &= x > 0
    exc = np.flatnonzero(~good & ~zero)
    codes[exc] = 0
    orig_words = flat.view(uword) if dtype != "bfloat16" else flat.astype(np.uint16)
    codec._side = _write_side(exc, orig_words[exc]) if exc.size else b""
    recon[exc] = x[exc]
    recon[zero] = 0.0
    zz: np.ndarray = ((codes << 1) ^ (codes >> 63)).astype(np.uint64).astype(uword)
    zz[zero] = _zero_word(uword)
    rec = {
        "domain": domain,
        "bound": bound.as_dict(),
        "eps": float(eps) if bound.mode != "elem" else None,
        "max_err": max_error(x, recon, bound),
        "exceptions": int(exc.size),
        "step": step,
    }
    del sword
    return codec, zz, recon, rec
