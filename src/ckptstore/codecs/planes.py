"""Byte planes + zstd: the array→bytes codec that ends every compressed chain.

Floating-point words are split into byte planes (all lowest bytes, then all next bytes, ...), because each byte
position has its own statistics: sign/exponent bytes are highly repetitive, low mantissa bytes are nearly random.
Each plane is then stored as zstd, raw (when zstd does not pay: random bytes cost time to code and save nothing),
or as one constant byte (a plane that never varies, such as the high bytes of small integer deltas).

Payload: ``u8 nplanes``, then per plane ``u8 method`` (0 raw, 1 zstd, 2 constant, 3 zstd chunks) and ``u64 value``
(payload length, or the constant byte), all little-endian, then the plane payloads back to back (format §10.3).

Large planes are cut into fixed-size chunks, each its own zstd frame (method 3, codec version 2), so one tensor's
coding spreads over every core in both directions: zstd decodes a frame on one thread only. The chunk size is fixed
(not derived from the thread count), so the bytes written never depend on the machine.
"""

from __future__ import annotations

import functools
import itertools
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

RAW, ZSTD, CONST, ZSTD_CHUNKS = 0, 1, 2, 3
# The zstd level every writer uses unless a store records another (ckptstore.json "settings", format §3).
DEFAULT_LEVEL = 1

_PLANE_HEADER = struct.Struct("<BQ")
# A zstd plane is kept only when it saves at least this fraction; otherwise raw is as small and much faster.
_MIN_SAVING = 0.02
# Planes at least this large are first checked for randomness on a sample (low mantissa bytes usually are).
_RANDOM_CHECK_BYTES = 1 << 16
_RANDOM_BITS = 7.97  # sampled order-0 entropy (bits/byte) above which a plane is stored raw
# Tensors at least this large have their planes coded, and their words joined, on the coding threads.
PARALLEL_BYTES = 4 * 1024 * 1024
# Planes longer than this are stored as independent zstd frames of this many bytes each (the last one shorter):
# work items that balance across threads. 1 MiB frames cost 0.02 % in bytes on the benchmark trajectory's large
# planes (256 KiB: 0.9 %), since zstd level 1 looks back 512 KiB at most.
CHUNK_BYTES = 1 << 20
_CHUNK_TABLE = struct.Struct("<QI")  # u64 chunk size, u32 chunk count; then count × u64 frame lengths

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_background_pool: ThreadPoolExecutor | None = None
_kind = threading.local()  # .background: the thread does background work (run_in_background)
_threads: int | None = None
_pool_lock = threading.Lock()
T = TypeVar("T")
R = TypeVar("R")


def coding_threads() -> int:
    """How many threads code one large tensor: the cores this process may run on (``set_coding_threads`` or
    ``CKPTSTORE_CODING_THREADS`` override it)."""
    global _threads
    if _threads is None:
        env = os.environ.get("CKPTSTORE_CODING_THREADS", "")
        if env.isdigit() and int(env) > 0:
            _threads = int(env)
        else:  # sched_getaffinity is Linux-only; elsewhere every core counts
            _threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return _threads


def set_coding_threads(n: int) -> None:
    """Set the number of coding threads (at least 1) for the tensors coded from now on."""
    global _threads, _pool, _background_pool
    if n < 1:
        raise ValueError("coding threads must be at least 1")
    with _pool_lock:
        _threads, old, _pool, old_bg, _background_pool = int(n), _pool, None, _background_pool, None
    for pool in (old, old_bg):
        if pool is not None:
            pool.shutdown(wait=False)


def plane_pool() -> ThreadPoolExecutor:
    """The coding threads of the calling thread's kind: foreground, or background (see :func:`run_in_background`),
    whose threads are started from a background thread and so inherit its lower priority."""
    global _pool, _background_pool
    background = getattr(_kind, "background", False)
    with _pool_lock:
        pool = _background_pool if background else _pool
        if pool is None:
            pool = ThreadPoolExecutor(
                max_workers=max(2, coding_threads()),
                thread_name_prefix="ckpt-planes-bg" if background else "ckpt-planes",
                initializer=_mark_background if background else None,
            )
            if background:
                _background_pool = pool
            else:
                _pool = pool
        return pool


def pmap(fn: Callable[[T], R], items: Sequence[T], parallel: bool) -> list[R]:
    """``[fn(x) for x in items]``, on the coding threads when ``parallel`` (for loops that release the GIL)."""
    if not parallel or len(items) < 2 or coding_threads() < 2:
        return [fn(x) for x in items]
    return list(plane_pool().map(fn, items))


# How much lower than the caller the background work runs (nice increment, 0-19); CKPTSTORE_BACKGROUND_NICE sets it.
BACKGROUND_NICE = 10


def run_in_background() -> None:
    """Mark the calling thread as background work (an async save's worker, the compactor): it runs at a lower CPU
    priority (nice + :data:`BACKGROUND_NICE`, Linux; best effort elsewhere), so on a machine whose cores the
    training loop keeps busy the loop's threads run first and the store codes in what they leave idle. Pools it
    starts (:func:`thread_initializer`) and its coding threads are background too."""
    _mark_background()
    env = os.environ.get("CKPTSTORE_BACKGROUND_NICE", "")
    step = int(env) if env.isdigit() else BACKGROUND_NICE
    if step <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):  # no per-thread priorities here: the work still runs, at normal priority
        pass


def _mark_background() -> None:
    _kind.background = True


def in_background() -> bool:
    """Whether the calling thread is marked as background work."""
    return bool(getattr(_kind, "background", False))


def thread_initializer() -> Callable[[], None] | None:
    """The ``initializer`` for a thread pool started by the calling thread: a background thread's pools are
    background too (their threads already inherit its priority from Linux)."""
    return _mark_background if in_background() else None


def spans(n: int, parallel: bool) -> list[tuple[int, int]]:
    """``[0, n)`` cut into one span per coding thread, or one span."""
    parts = coding_threads() if parallel else 1
    if parts == 1 or n < 2:
        return [(0, n)]
    cuts = sorted({n * i // parts for i in range(1, parts)} - {0, n})
    edges = [0, *cuts, n]
    return list(itertools.pairwise(edges))


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


_RANDOM_SAMPLE = 1 << 13


def _looks_random(plane: np.ndarray, sample: int = _RANDOM_SAMPLE) -> bool:
    return _entropy_high(plane[:: max(1, plane.size // sample)])


def random_sample(n: int) -> slice:
    """The elements whose bytes decide whether a plane of ``n`` bytes is stored raw (see :func:`_looks_random`)."""
    return slice(0, n, max(1, n // _RANDOM_SAMPLE))


def _entropy_high(s: np.ndarray) -> bool:
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
    version = 2  # what this reader reads; 2 added chunked planes (method 3). Records say what each payload needs.

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = int(level)

    def config(self) -> dict[str, Any]:
        return {"level": self.level}

    def encode(self, words: np.ndarray, spec: TensorSpec) -> bytes:
        return b"".join(self.encode_parts(words, spec))

    @staticmethod
    def smallest_payload(spec: TensorSpec) -> int:
        """No payload of this codec for ``spec`` is shorter than its header: one count byte and a (method, value)
        entry per byte plane. A tensor no larger than this is always stored raw."""
        return 1 + (spec.dt.itemsize if spec.dtype != "complex128" else 8) * _PLANE_HEADER.size

    def encode_parts(
        self,
        words: np.ndarray,
        spec: TensorSpec,
        planes: np.ndarray | None = None,
        chunk: int | None = None,
    ) -> list[bytes | memoryview]:
        """The payload as header + pieces per plane, so a writer can stream it without concatenating.
        ``planes``: the words already split (by a fused codec loop); ``words`` then only gives the width.
        ``chunk``: planes longer than this are coded as independent frames of this size (method 3); default
        :data:`CHUNK_BYTES`."""
        chunk = CHUNK_BYTES if chunk is None else chunk
        k = words.dtype.itemsize
        if planes is None:
            planes = split_planes(words) if k > 1 else words.view(np.uint8).reshape(1, -1)
        rows = list(planes)
        n = planes.shape[1] if planes.ndim == 2 else 0
        level = self.level
        # Which planes go through zstd, cut into which frames: one task per frame, spread over the threads.
        coded = [not (n >= _RANDOM_CHECK_BYTES and _looks_random(plane)) for plane in rows]
        cuts = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)] if n > chunk else [(0, n)]
        tasks = [(i, lo, hi) for i in range(len(rows)) if coded[i] for lo, hi in cuts]
        frames = pmap(
            lambda t: _cctx(level).compress(memoryview(rows[t[0]][t[1] : t[2]])),
            tasks,
            words.nbytes >= PARALLEL_BYTES,
        )
        by_plane: dict[int, list[bytes]] = {}
        for (i, _, _), frame in zip(tasks, frames, strict=True):
            by_plane.setdefault(i, []).append(frame)
        entries: list[tuple[int, int]] = []
        pieces: list[bytes | memoryview] = []
        for i, plane in enumerate(rows):
            got = by_plane.get(i)
            constant = int(plane[0]) if got is not None and _tiny(got) and n and (plane == plane[0]).all() else None
            stored = _zstd_entry(got, n, chunk, constant) if got is not None else None
            if stored is None:  # zstd: time spent, nothing saved
                stored = (RAW, n), [memoryview(plane)]
            entries.append(stored[0])
            pieces += stored[1]
        header = bytes([len(entries)]) + b"".join(_PLANE_HEADER.pack(m, v) for m, v in entries)
        return [header, *pieces]

    def encode_chunks(
        self,
        n: int,
        sample: np.ndarray,
        fill: Callable[[int, int, list[np.ndarray]], None],
        parallel: bool,
        chunk: int | None = None,
    ) -> list[bytes | memoryview] | None:
        """The payload of :meth:`encode_parts`, byte for byte, with the planes produced chunk by chunk:
        ``fill(lo, hi, planes)`` writes the byte planes of elements ``[lo, hi)`` into the buffers given (from any
        thread), and each chunk is compressed while it is still in the cache. ``sample``: the planes at
        :func:`random_sample` (``(k, m)``), which decide the planes stored raw before any chunk is made. None
        when the tensor is a single chunk (use :meth:`encode_parts`)."""
        chunk = CHUNK_BYTES if chunk is None else chunk
        k = sample.shape[0]
        if n <= chunk:
            return None
        level = self.level
        coded = [not (n >= _RANDOM_CHECK_BYTES and _entropy_high(sample[i])) for i in range(k)]
        raw = {i: np.empty(n, dtype=np.uint8) for i in range(k) if not coded[i]}
        cuts = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]

        def run(j: int) -> list[tuple[bytes, int | None]]:
            lo, hi = cuts[j]
            scratch = _scratch(k, chunk)
            planes = [raw[i][lo:hi] if i in raw else scratch[i, : hi - lo] for i in range(k)]
            fill(lo, hi, planes)
            out: list[tuple[bytes, int | None]] = []
            for i in range(k):
                if i in raw:
                    out.append((b"", None))
                    continue
                frame = _cctx(level).compress(memoryview(planes[i]))  # type: ignore[arg-type]
                const = int(planes[i][0]) if len(frame) < 64 and (planes[i] == planes[i][0]).all() else None
                out.append((frame, const))
            return out

        chunks = pmap(run, range(len(cuts)), parallel)
        entries: list[tuple[int, int]] = []
        pieces: list[bytes | memoryview] = []
        for i in range(k):
            frames = [c[i][0] for c in chunks]
            consts = {c[i][1] for c in chunks}
            constant = consts.pop() if i not in raw and len(consts) == 1 and _tiny(frames) else None
            stored = _zstd_entry(frames, n, chunk, constant) if i not in raw else None
            if stored is None:
                if i not in raw:  # zstd did not pay after all: the plane's bytes again, stored as they are
                    plane = raw[i] = np.empty(n, dtype=np.uint8)
                    pmap(functools.partial(_refill, cuts, k, chunk, fill, i, plane), range(len(cuts)), parallel)
                stored = (RAW, n), [memoryview(raw[i])]  # type: ignore[arg-type]
            entries.append(stored[0])
            pieces += stored[1]
        header = bytes([k]) + b"".join(_PLANE_HEADER.pack(m, v) for m, v in entries)
        return [header, *pieces]

    def record_for(self, payload: Sequence[bytes | memoryview]) -> dict[str, Any]:
        """Version 1 unless the payload has a chunked plane (method 3), so version-1 readers read what they can."""
        header = memoryview(payload[0]) if payload else memoryview(b"")
        chunked = len(header) > 0 and any(header[1 + i * _PLANE_HEADER.size] == ZSTD_CHUNKS for i in range(header[0]))
        return {"name": self.name, "version": 2 if chunked else 1, "config": self.config()}

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
            cuts = spans(n, n * 4 >= PARALLEL_BYTES)
            pmap(lambda lh: kernels.join_planes4(*(p[lh[0] : lh[1]] for p in planes), out[lh[0] : lh[1]]), cuts, True)
            return out
        return join_planes(np.stack(planes), word)

    def decode_planes(self, payload: memoryview | bytes, spec: TensorSpec) -> list[np.ndarray]:
        """The byte planes of a payload, lowest byte first, each ``n`` bytes; raw planes are read-only views into
        ``payload`` (no copy), the others fresh arrays."""
        k = spec.dt.itemsize if spec.dtype != "complex128" else 8
        n = spec.size
        pieces = _pieces(payload, k)
        out: list[np.ndarray] = []
        tasks: list[tuple[np.ndarray, memoryview]] = []  # (where, frame): each frame decoded straight into place
        for method, value, data in pieces:
            if method == CONST:
                if value > 255:
                    raise CodecError(f"planes-zstd constant plane has value {value} > 255")
                out.append(np.full(n, value, dtype=np.uint8))
            elif method == RAW:
                if len(data) != n:
                    raise CodecError("planes-zstd raw plane has the wrong length")
                out.append(np.frombuffer(data, dtype=np.uint8))
            else:
                out.append(np.empty(n, dtype=np.uint8))
                frames = [(0, n, data)] if method == ZSTD else _chunk_frames(data, n)
                tasks += [(out[-1][lo:hi], frame) for lo, hi, frame in frames]
        pmap(lambda t: _decompress_into(t[1], t[0]), tasks, n * k >= PARALLEL_BYTES)
        return out

    def decode_chunks(
        self, payload: memoryview | bytes, spec: TensorSpec, consume: Callable[[list[np.ndarray], int, int], None]
    ) -> bool:
        """Decode a chunked payload chunk by chunk: ``consume(planes, lo, hi)`` gets the byte planes of elements
        ``[lo, hi)`` (reused per-thread buffers: copy what must outlive the call), on the coding threads. The
        planes of a chunk never leave the cache between their decompression and their use, so a large tensor
        crosses main memory once instead of three times. False (nothing done) when the payload is not chunked."""
        k = spec.dt.itemsize if spec.dtype != "complex128" else 8
        n = spec.size
        pieces = _pieces(payload, k)
        if not any(m == ZSTD_CHUNKS for m, _, _ in pieces) or any(m == ZSTD for m, _, _ in pieces):
            return False
        frames = [_chunk_frames(data, n) if m == ZSTD_CHUNKS else [] for m, _, data in pieces]
        cuts = next(f for f in frames if f)
        if any(f and [(lo, hi) for lo, hi, _ in f] != [(lo, hi) for lo, hi, _ in cuts] for f in frames):
            return False  # planes chunked differently (not written by this encoder): plane by plane instead
        for m, value, data in pieces:
            if m == CONST and value > 255:
                raise CodecError(f"planes-zstd constant plane has value {value} > 255")
            if m == RAW and len(data) != n:
                raise CodecError("planes-zstd raw plane has the wrong length")
        size = cuts[0][1] - cuts[0][0]

        def run(j: int) -> None:
            lo, hi = cuts[j][0], cuts[j][1]
            scratch = _scratch(k, size)
            planes = []
            for i, (m, value, data) in enumerate(pieces):
                if m == RAW:
                    planes.append(np.frombuffer(data[lo:hi], dtype=np.uint8))
                    continue
                plane = scratch[i, : hi - lo]
                if m == CONST:
                    plane.fill(value)
                else:
                    _decompress_into(frames[i][j][2], plane)
                planes.append(plane)
            consume(planes, lo, hi)

        pmap(run, range(len(cuts)), n * k >= PARALLEL_BYTES)
        return True


def _tiny(frames: Sequence[bytes]) -> bool:
    """Frames this small can only hold a constant plane (checked byte by byte before CONST is written)."""
    return sum(len(f) for f in frames) < 64 * len(frames)


def _zstd_entry(
    frames: Sequence[bytes], n: int, chunk: int, constant: int | None
) -> tuple[tuple[int, int], list[bytes | memoryview]] | None:
    """How a plane coded as ``frames`` (one per chunk of ``chunk`` bytes) is stored: ``((method, value), pieces)``
    for a constant plane (``constant``: its byte), one zstd frame or a chunk table and its frames; None when zstd
    does not save enough and the plane is to be stored raw."""
    if constant is not None:
        return (CONST, constant), []
    size = sum(len(f) for f in frames)
    if len(frames) == 1:
        return ((ZSTD, size), list(frames)) if size < n * (1 - _MIN_SAVING) else None
    table = _CHUNK_TABLE.pack(chunk, len(frames)) + struct.pack(f"<{len(frames)}Q", *(len(f) for f in frames))
    if len(table) + size < n * (1 - _MIN_SAVING):
        return (ZSTD_CHUNKS, len(table) + size), [table, *frames]
    return None


def _refill(
    cuts: list[tuple[int, int]], k: int, chunk: int, fill: Callable[[int, int, list[np.ndarray]], None], i: int,
    plane: np.ndarray, j: int,
) -> None:  # fmt: skip
    """Plane ``i`` of chunk ``j`` made again (``fill``) and copied into ``plane``."""
    lo, hi = cuts[j]
    scratch = _scratch(k, chunk)
    planes = [scratch[t, : hi - lo] for t in range(k)]
    fill(lo, hi, planes)
    plane[lo:hi] = planes[i]


def _pieces(payload: memoryview | bytes, k: int) -> list[tuple[int, int, memoryview]]:
    """A payload's planes as ``(method, value, data)``, after checking the header against the payload."""
    buf = memoryview(payload)
    if len(buf) < 1 or buf[0] != k:
        raise CodecError(f"planes-zstd payload has {buf[0] if len(buf) else 0} planes, expected {k}")
    pos = 1 + k * _PLANE_HEADER.size
    if pos > len(buf):
        raise CodecError("planes-zstd header truncated")
    fields = _headers(k).unpack_from(buf, 1)  # (method, value) for every plane, in one call
    pieces = []
    for method, value in zip(fields[::2], fields[1::2], strict=True):
        length = value if method in (RAW, ZSTD, ZSTD_CHUNKS) else 0
        if method not in (RAW, ZSTD, CONST, ZSTD_CHUNKS) or pos + length > len(buf):
            raise CodecError("planes-zstd payload truncated or corrupt")
        pieces.append((method, value, buf[pos : pos + length]))
        pos += length
    return pieces


@functools.cache
def _headers(k: int) -> struct.Struct:
    return struct.Struct("<" + "BQ" * k)


def _scratch(k: int, size: int) -> np.ndarray:
    """This thread's (k, size) buffer for the planes of one chunk (kept: reused by the next chunk)."""
    buf: np.ndarray | None = getattr(_local, "scratch", None)
    if buf is None or buf.shape[0] < k or buf.shape[1] < size:
        buf = _local.scratch = np.empty((max(k, 4), max(size, CHUNK_BYTES)), dtype=np.uint8)
    return buf


def _chunk_frames(data: memoryview, n: int) -> list[tuple[int, int, memoryview]]:
    """The frames of a chunked plane (method 3) as ``(lo, hi, frame)``, after checking its chunk table."""
    if len(data) < _CHUNK_TABLE.size:
        raise CodecError("planes-zstd chunk table truncated")
    chunk, count = _CHUNK_TABLE.unpack_from(data, 0)
    if chunk < 1 or count != -(-n // chunk) or count < 2:
        raise CodecError(f"planes-zstd chunk table says {count} chunks of {chunk} bytes for a {n}-byte plane")
    pos = _CHUNK_TABLE.size + 8 * count
    if pos > len(data):
        raise CodecError("planes-zstd chunk table truncated")
    lengths = struct.unpack_from(f"<{count}Q", data, _CHUNK_TABLE.size)
    if pos + sum(lengths) != len(data):
        raise CodecError("planes-zstd chunk lengths do not add up to the plane's data")
    tasks = []
    for j, length in enumerate(lengths):
        lo = j * chunk
        tasks.append((lo, min(n, lo + chunk), data[pos : pos + length]))
        pos += length
    return tasks


def _decompress_into(data: memoryview, target: np.ndarray) -> None:
    """Decode one zstd frame, which must hold exactly ``target.size`` bytes, into ``target`` (no temporary)."""
    n = target.size
    view = memoryview(target)  # type: ignore[arg-type]
    try:
        declared = zstandard.frame_content_size(data)
        if declared != n:  # refuse before writing what a damaged header claims
            raise CodecError(f"zstd plane declares {declared} bytes, expected {n}")
        reader = _dctx().stream_reader(data)
        got = 0
        while got < n:
            step = reader.readinto(view[got:])
            if not step:
                break
            got += step
        extra = reader.read(1) if got == n else b""
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd plane does not decode: {exc}") from None
    if got != n or extra:
        raise CodecError("zstd plane decoded to the wrong length")


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
