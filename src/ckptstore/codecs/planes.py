"""Byte planes + zstd: the array→bytes codec that ends every compressed chain.

Floating-point words are split into byte planes (all lowest bytes, then all next bytes, ...), because each byte
position has its own statistics: sign/exponent bytes are highly repetitive, low mantissa bytes are nearly random.
Each plane is then stored as zstd, raw (when zstd does not pay: random bytes cost time to code and save nothing),
or as one constant byte (a plane that never varies, such as the high bytes of small integer deltas).

Payload: ``u8 nplanes``, then per plane ``u8 method`` (0 raw, 1 zstd, 2 constant) and ``u64 value`` (payload
length, or the constant byte), all little-endian, then the plane payloads back to back.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import zstandard

from ckptstore.codecs.base import BytesCodec, TensorSpec, register
from ckptstore.errors import CodecError

try:  # optional C loops (setup.py); CKPTSTORE_NO_KERNELS=1 forces the numpy reference implementation
    from ckptstore.codecs import _kernels as kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised where the extension was not built
    kernels = None
if os.environ.get("CKPTSTORE_NO_KERNELS"):
    kernels = None

RAW, ZSTD, CONST = 0, 1, 2
# The zstd level every writer uses unless a store records another (ckptstore.json "settings", format §3).
DEFAULT_LEVEL = 1

_PLANE_HEADER = struct.Struct("<BQ")
# A zstd plane is kept only when it saves at least this fraction; otherwise raw is as small and much faster.
_MIN_SAVING = 0.02
# Planes at least this large are first checked for randomness on a sample (low mantissa bytes usually are).
_RANDOM_CHECK_BYTES = 1 << 16
_RANDOM_BITS = 7.97  # sampled order-0 entropy (bits/byte) above which a plane is stored raw
# Tensors at least this large have their planes coded, and their words joined, on the two plane threads.
PARALLEL_BYTES = 4 * 1024 * 1024

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
T = TypeVar("T")
R = TypeVar("R")


def plane_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-planes")
        return _pool


def pmap(fn: Callable[[T], R], items: Sequence[T], parallel: bool) -> list[R]:
    """``[fn(x) for x in items]``, on the two plane threads when ``parallel`` (for loops that release the GIL)."""
    if not parallel or len(items) < 2:
        return [fn(x) for x in items]
    return list(plane_pool().map(fn, items))


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _looks_random(plane: np.ndarray, sample: int = 1 << 13) -> bool:
    s = plane[:: max(1, plane.size // sample)]
    counts = np.bincount(s, minlength=256).astype(np.float64)
    nz = counts[counts > 0]
    return bool(-(nz * np.log2(nz / s.size)).sum() / s.size > _RANDOM_BITS)


def split_planes(words: np.ndarray) -> np.ndarray:
    """(n,) words of k bytes → (k, n) uint8 planes, lowest byte first."""
    k = words.dtype.itemsize
    if kernels is not None:
        out = np.empty((k, words.size), dtype=np.uint8)
        kernels.split_planes(np.ascontiguousarray(words), k, out)
        return out
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, k).T)


def join_planes(planes: np.ndarray, word: np.dtype) -> np.ndarray:
    if kernels is not None:
        out = np.empty(planes.shape[1], dtype=word)
        kernels.join_planes(np.ascontiguousarray(planes), planes.shape[0], out)
        return out
    return np.ascontiguousarray(planes.T).view(word).reshape(-1)


@register
class BytePlanesZstd(BytesCodec):
    name = "planes-zstd"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = int(level)

    def config(self) -> dict[str, Any]:
        return {"level": self.level}

    def encode(self, words: np.ndarray, spec: TensorSpec) -> bytes:
        return b"".join(self.encode_parts(words, spec))

    def encode_parts(
        self, words: np.ndarray, spec: TensorSpec, planes: np.ndarray | None = None
    ) -> list[bytes | memoryview]:
        """The payload as header + one piece per plane, so a writer can stream it without concatenating.
        ``planes``: the words already split (by a fused codec loop); ``words`` then only gives the width."""
        k = words.dtype.itemsize
        if planes is None:
            planes = split_planes(words) if k > 1 else words.view(np.uint8).reshape(1, -1)
        level = self.level

        def code(plane: np.ndarray) -> tuple[int, int, bytes | memoryview]:
            n = plane.size
            if n >= _RANDOM_CHECK_BYTES and _looks_random(plane):
                return RAW, n, memoryview(plane)  # type: ignore[arg-type]  # zstd: time spent, nothing saved
            packed = _cctx(level).compress(memoryview(plane))  # type: ignore[arg-type]
            if len(packed) < 64 and n and (plane == plane[0]).all():
                return CONST, int(plane[0]), b""
            if len(packed) < n * (1 - _MIN_SAVING):
                return ZSTD, len(packed), packed
            return RAW, n, memoryview(plane)  # type: ignore[arg-type]

        parts = pmap(code, list(planes), words.nbytes >= PARALLEL_BYTES)
        header = bytes([len(parts)]) + b"".join(_PLANE_HEADER.pack(m, v) for m, v, _ in parts)
        return [header, *(p for _, _, p in parts)]

    def decode(self, payload: memoryview | bytes, spec: TensorSpec) -> np.ndarray:
        return self.join(self.decode_planes(payload, spec), spec)

    @staticmethod
    def join(planes: list[np.ndarray], spec: TensorSpec) -> np.ndarray:
        """Byte planes (as :meth:`decode_planes` returns them) -> a fresh array of the tensor's words."""
        k = len(planes)
        word = np.dtype(f"<u{k}")
        if k == 1:
            return np.array(planes[0], copy=True).view(word)
        if k == 4 and kernels is not None:
            n = spec.size
            out = np.empty(n, dtype=word)
            cut = n // 2 if n * 4 >= PARALLEL_BYTES else n
            spans = [(0, cut), (cut, n)] if cut < n else [(0, n)]
            pmap(lambda lh: kernels.join_planes4(*(p[lh[0] : lh[1]] for p in planes), out[lh[0] : lh[1]]), spans, True)
            return out
        return join_planes(np.stack(planes), word)

    def decode_planes(self, payload: memoryview | bytes, spec: TensorSpec) -> list[np.ndarray]:
        """The byte planes of a payload, lowest byte first, each ``n`` bytes; raw planes are read-only views into
        ``payload`` (no copy), the others fresh arrays."""
        k = spec.dt.itemsize if spec.dtype != "complex128" else 8
        n = spec.size
        buf = memoryview(payload)
        if len(buf) < 1 or buf[0] != k:
            raise CodecError(f"planes-zstd payload has {buf[0] if len(buf) else 0} planes, expected {k}")
        pos = 1
        entries = []
        for _ in range(k):
            if pos + _PLANE_HEADER.size > len(buf):
                raise CodecError("planes-zstd header truncated")
            entries.append(_PLANE_HEADER.unpack_from(buf, pos))
            pos += _PLANE_HEADER.size
        spans = []
        for method, value in entries:
            length = value if method in (RAW, ZSTD) else 0
            if method not in (RAW, ZSTD, CONST) or pos + length > len(buf):
                raise CodecError("planes-zstd payload truncated or corrupt")
            spans.append((method, value, buf[pos : pos + length]))
            pos += length

        def plane(i: int) -> np.ndarray:
            method, value, data = spans[i]
            if method == CONST:
                if value > 255:
                    raise CodecError(f"planes-zstd constant plane has value {value} > 255")
                return np.full(n, value, dtype=np.uint8)
            if method == RAW:
                if len(data) != n:
                    raise CodecError("planes-zstd raw plane has the wrong length")
                return np.frombuffer(data, dtype=np.uint8)
            try:
                declared = zstandard.frame_content_size(data)
                if declared != n:  # refuse before allocating what a damaged header claims
                    raise CodecError(f"zstd plane declares {declared} bytes, expected {n}")
                out = _dctx().decompress(data, max_output_size=n)
            except zstandard.ZstdError as exc:
                raise CodecError(f"zstd plane does not decode: {exc}") from None
            if len(out) != n:
                raise CodecError("zstd plane decoded to the wrong length")
            return np.frombuffer(out, dtype=np.uint8)

        return pmap(plane, list(range(k)), n * k >= PARALLEL_BYTES)


def estimate_bits(words: np.ndarray, sample: int = 1 << 14) -> float:
    """Order-0 entropy of each byte plane on a strided sample, in bits per element: a cheap cost model."""
    n = words.size
    if n == 0:
        return 0.0
    step = max(1, n // sample)
    k = words.dtype.itemsize
    m = (n + step - 1) // step
    if kernels is not None and words.flags.c_contiguous:
        hist = np.empty(256 * k, dtype=np.int64)
        kernels.plane_histogram(words, k, step, hist)
        counts = hist.astype(np.float64)
    else:
        # one bincount over (plane, byte) pairs instead of one per plane
        keys = np.ascontiguousarray(words[::step]).view(np.uint8).reshape(-1, k).astype(np.intp)
        keys += np.arange(k, dtype=np.intp) * 256
        counts = np.bincount(keys.reshape(-1), minlength=256 * k).astype(np.float64)
    nz = counts[counts > 0]
    return float(-(nz * np.log2(nz / m)).sum() / m)
