"""Choosing and running codec chains for one tensor.

``encode`` decides between a keyframe (byte planes + zstd), a delta against the reference tensor, and raw bytes,
using a sampled order-0 entropy estimate so the choice costs a small fraction of the coding itself; whatever it
picks, the result is raw when coding does not pay. ``decode`` runs a stored chain backwards.
"""

from __future__ import annotations

import functools
import inspect
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptstore.codecs import planes as _planes
from ckptstore.codecs.base import ArrayCodec, BytesCodec, TensorSpec, from_record, registered
from ckptstore.codecs.delta import OrderedDelta
from ckptstore.codecs.planes import (
    DEFAULT_LEVEL,
    PARALLEL_BYTES,
    BytePlanesZstd,
    estimate_bits,
    kernels,
    random_sample,
)
from ckptstore.errors import CodecError

# The bytes codec that ends every chain unless a store records another (ckptstore.json "settings", format §3).
DEFAULT_BYTES_CODEC = BytePlanesZstd.name
# A delta must beat the keyframe estimate by this factor to be worth a dependency on another object.
DELTA_MIN_GAIN = 0.97
# Tensors of at most this many elements are coded both ways and the smaller kept (no cost model).
SMALL_TENSOR = 4096


@dataclass
class Encoded:
    codecs: list[dict[str, Any]]
    roles: tuple[str, ...]  # reference roles the chain needs (empty for keyframes and raw)
    parts: list[bytes | memoryview]  # the payload, in pieces: written out as they are, never concatenated

    @property
    def is_keyframe(self) -> bool:
        return not self.roles

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def payload(self) -> bytes:
        return b"".join(self.parts)


def encode(
    words: np.ndarray,
    spec: TensorSpec,
    refs: Mapping[str, np.ndarray] | None = None,
    *,
    level: int = DEFAULT_LEVEL,
    codec: str = DEFAULT_BYTES_CODEC,
) -> Encoded:
    """Encode one tensor's words; ``refs`` (role → words) are the candidates for delta coding. ``codec`` names the
    registered bytes codec that ends the chain (``level`` is its config's ``level`` when it takes one)."""
    if words.size == 0:
        return Encoded([], (), [])
    array_codecs: list[ArrayCodec] = []
    prev = (refs or {}).get("prev")
    usable = prev is not None and prev.shape == words.shape and prev.dtype == words.dtype and spec.size >= 16
    last = bytes_codec(codec, level)
    if isinstance(last, BytePlanesZstd) and words.nbytes <= max(RAW_MAX_BYTES, last.smallest_payload(spec)):
        # A step counter, a one-element norm: stored raw without trying the codecs. Up to the planes header's
        # size nothing is shorter than raw anyway; up to RAW_MAX_BYTES coding saves at most a few dozen bytes
        # (64 - 10 for a 1-byte dtype), a fraction of the ~260-300-byte manifest record each object costs whatever
        # its payload, for ~50 µs of Python per tensor (trying a keyframe and a delta): 3/4 of a save of 1,376
        # such tensors (benchmarks/small_tensors_bench.py).
        return _raw(words)
    if usable and spec.size <= SMALL_TENSOR:
        # Small tensors (biases, norms, counters): coding both candidates outright is cheaper than fitting a
        # cost model, and exact. Predictor fitting is left to tensors where it pays.
        assert prev is not None
        key = _finish(words, spec, [], last)
        dlt = _finish(words, spec, [OrderedDelta("prev")], last, prev)
        return dlt if dlt.nbytes < key.nbytes * DELTA_MIN_GAIN else key
    if usable:
        assert prev is not None
        delta, delta_bits = OrderedDelta.fit(words, prev, spec)
        key_bits = estimate_bits(words)
        if delta_bits < key_bits * DELTA_MIN_GAIN:
            array_codecs.append(delta)
    return _finish(words, spec, array_codecs, last, prev)


# Tensors of at most this many bytes are stored raw (see encode).
RAW_MAX_BYTES = 64


def bytes_codec(name: str, level: int = DEFAULT_LEVEL) -> BytesCodec:
    """The registered bytes codec ``name``, configured with ``level`` if its config takes one."""
    cls = registered().get(name)
    if cls is None or not issubclass(cls, BytesCodec):
        known = sorted(n for n, c in registered().items() if issubclass(c, BytesCodec))
        raise CodecError(f"no bytes codec named {name!r}", hint=f"registered bytes codecs: {', '.join(known)}")
    codec = cls.from_config({"level": level} if _takes_level(cls) else {})
    assert isinstance(codec, BytesCodec)
    return codec


@functools.cache
def _takes_level(cls: type) -> bool:
    # inspect.signature costs ~20 µs: once per class, not once per tensor saved
    return "level" in inspect.signature(cls).parameters


def _finish(
    words: np.ndarray,
    spec: TensorSpec,
    array_codecs: list[ArrayCodec],
    last: BytesCodec,
    prev: np.ndarray | None = None,
) -> Encoded:
    """Run the chosen array codecs, then the bytes codec; raw when that does not pay."""
    coded = words
    refs = {"prev": prev} if prev is not None else {}
    planes = None
    body: list[bytes | memoryview] | None = None
    if isinstance(last, BytePlanesZstd) and len(array_codecs) <= 1:
        fused = _span_encoder(words, spec, array_codecs, refs)  # chunk by chunk: the planes stay in the cache
        if fused is not None:
            body = last.encode_chunks(spec.size, fused[0], fused[1], words.nbytes >= PARALLEL_BYTES)
    if body is None and len(array_codecs) == 1:
        planes = array_codecs[0].encode_planes(words, spec, refs)  # the codec's fused plane split, if it has one
    if body is None and planes is None:
        for c in array_codecs:
            coded = c.encode(coded, spec, refs)
    if body is None:
        body = (
            last.encode_parts(coded, spec, planes) if isinstance(last, BytePlanesZstd) else [last.encode(coded, spec)]
        )
    parts = [_side_prefix(array_codecs), *body]
    if sum(len(p) for p in parts) >= words.nbytes:
        return _raw(words)
    roles = tuple(r for c in array_codecs for r in c.ref_roles())
    return Encoded([c.record() for c in array_codecs] + [last.record_for(body)], roles, parts)


def _raw(words: np.ndarray) -> Encoded:
    return Encoded([], (), [memoryview(np.ascontiguousarray(words)).cast("B")])  # type: ignore[arg-type]


def _span_encoder(
    words: np.ndarray, spec: TensorSpec, array_codecs: Sequence[ArrayCodec], refs: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, Callable[[int, int, list[np.ndarray]], None]] | None:
    """``(sample, fill)`` for :meth:`BytePlanesZstd.encode_chunks`: a keyframe of 4-byte words (planes split
    per chunk), or one delta codec with its C loop; None otherwise."""
    if not array_codecs:
        if words.dtype.itemsize != 4 or kernels is None or spec.dtype == "complex128":
            return None
        cur = np.ascontiguousarray(words)
        picked = np.ascontiguousarray(cur[random_sample(cur.size)])
        sample = np.empty((4, picked.size), dtype=np.uint8)
        kernels.split_planes4(picked, *sample)
        return sample, lambda lo, hi, planes: kernels.split_planes4(cur[lo:hi], *planes)
    codec = array_codecs[0]
    return codec.span_encoder(words, spec, refs) if isinstance(codec, OrderedDelta) else None


def _side_prefix(array_codecs: Sequence[ArrayCodec]) -> bytes:
    """Side data of each array codec that has some: ``u64 length`` + bytes, in chain order."""
    out = b""
    for c in array_codecs:
        side = c.side_bytes()
        if c.config().get("side"):
            out += struct.pack("<Q", len(side)) + side
    return out


def decode(
    payload: memoryview | bytes,
    codecs: Sequence[Mapping[str, Any]],
    spec: TensorSpec,
    refs: Mapping[str, np.ndarray] | None = None,
    *,
    reusable: Collection[str] = (),
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode a payload through its stored chain into flat words of the tensor's width.

    ``reusable``: roles of ``refs`` whose arrays the caller hands over (it decoded them only for this call); a
    fused delta decode writes its result into such an array instead of a fresh one. ``out``: flat words of the
    tensor's width to write the result into where no such array takes it (a buffer of the caller's pool)."""
    word = np.dtype(f"<u{spec.dt.itemsize if spec.dtype != 'complex128' else 8}")
    if not codecs:
        if len(payload) != spec.nbytes:
            raise CodecError(f"raw payload is {len(payload)} bytes, expected {spec.nbytes}")
        raw = np.frombuffer(payload, dtype=word)
        if out is not None and _fits(out, raw):
            np.copyto(out, raw)
            return out
        return raw.copy()
    chain = [from_record(r) for r in codecs]
    *array_codecs, last = chain
    if not isinstance(last, BytesCodec) or not all(isinstance(c, ArrayCodec) for c in array_codecs):
        raise CodecError(f"malformed codec chain {[r.get('name') for r in codecs]}")
    view = memoryview(payload)
    for c, rec in zip(array_codecs, codecs[:-1], strict=True):
        if rec.get("config", {}).get("side"):
            side, view = split_side(view)
            assert isinstance(c, ArrayCodec)
            c.load_side(bytes(side))
    stages = [c for c in array_codecs if isinstance(c, ArrayCodec)]  # all of them (checked above); typed
    spare = [refs[r] for r in stages[0].ref_roles() if r in reusable] if refs and len(stages) == 1 else []
    if not spare and out is not None:
        spare = [out]
    if isinstance(last, BytePlanesZstd):
        chunked = _decode_chunks(last, view, spec, stages, refs or {}, spare[0] if spare else None)
        if chunked is not None:  # chunk by chunk: planes, join and array codec in one pass per chunk
            return chunked
        planes = last.decode_planes(view, spec)
        fused = None
        if len(stages) == 1:
            fused = stages[0].decode_planes(planes, spec, refs or {}, spare[0] if spare else None)
        if fused is not None:  # planes joined and the array codec undone in one pass
            return fused
        words = last.join(planes, spec)
    else:
        words = last.decode(view, spec)
    if words.size != spec.size:
        raise CodecError(f"decoded {words.size} elements, expected {spec.size}")
    for c in reversed(stages):
        words = c.decode(words, spec, refs or {})
    # Without the fused kernel (not built, or another chain) the result is fresh: it still goes into the handed
    # reference, so a chain decode keeps one buffer per tensor whichever path ran.
    if spare and _fits(spare[0], words):
        np.copyto(spare[0], words)
        return spare[0]
    return words


def split_side(view: memoryview) -> tuple[memoryview, memoryview]:
    """An array codec's side data at the start of ``view`` (``u64 length`` + bytes) and the payload after it."""
    if len(view) < 8:
        raise CodecError("side data header truncated")
    (length,) = struct.unpack_from("<Q", view, 0)
    if 8 + length > len(view):
        raise CodecError("side data truncated")
    return view[8 : 8 + length], view[8 + length :]


def _decode_chunks(
    last: BytePlanesZstd,
    view: memoryview,
    spec: TensorSpec,
    stages: Sequence[ArrayCodec],
    refs: Mapping[str, np.ndarray],
    spare: np.ndarray | None,
) -> np.ndarray | None:
    """A chunked payload (format §10.3, method 3) decoded chunk by chunk when a fused loop applies: a keyframe of
    4-byte words (planes joined per chunk) or one delta codec with its C loop. None when it does not apply."""
    if spec.size <= _planes.CHUNK_BYTES or spec.dt.itemsize != 4 or spec.dtype == "complex128" or kernels is None:
        return None  # (a payload chunked finer than this writer does still decodes, plane by plane)
    if len(stages) > 1:
        return None
    if stages:
        fused = stages[0].span_decoder(spec, refs, spare) if isinstance(stages[0], OrderedDelta) else None
        if fused is None:
            return None
        out, consume = fused
    else:
        fits = spare is not None and _writable(spare, (spec.size,), np.dtype(np.uint32))
        out = spare if fits and spare is not None else np.empty(spec.size, dtype=np.uint32)

        def consume(planes: list[np.ndarray], lo: int, hi: int) -> None:
            kernels.join_planes4(*planes, out[lo:hi])

    return out if last.decode_chunks(view, spec, consume) else None


def _fits(buffer: np.ndarray, words: np.ndarray) -> bool:
    return buffer is not words and _writable(buffer, words.shape, words.dtype)


def _writable(buffer: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether results of this shape and dtype can be written into ``buffer`` in place."""
    return buffer.dtype == dtype and buffer.shape == shape and buffer.flags.c_contiguous and buffer.flags.writeable
