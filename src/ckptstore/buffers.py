"""Output buffers that come back: the large arrays an in-order read hands out return to its pool once the caller
has let go of them, and the next checkpoint's tensors of the same dtype and size are decoded into them.

Why: fresh memory costs the kernel a zeroed page per fault, and glibc gives large freed arrays back to the kernel
(one over its mmap threshold is unmapped; a thread arena's heap is unmapped once empty), so each checkpoint of a
run read in order went into fresh memory: on the benchmark trajectory the kernel's page clearing was 17 % of the
read's CPU time (docs/benchmarks.md). ``torch.load`` on the calling thread reuses the main heap instead.

A buffer is reused only when nothing but the pool holds it: the caller gets a view of it, and it returns when
that view and everything made from it (torch tensors, numpy views) are gone; one whose base the caller kept hold
of (``view.base``) is never reused.
"""

from __future__ import annotations

import mmap
import sys
import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["BufferPool", "fresh_words"]

# numpy advises arrays of at least this many bytes for transparent huge pages; fresh_words takes that back.
HUGE_BYTES = 4 << 20
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)
_madvise: Any = None


def fresh_words(dtype: np.dtype, size: int) -> np.ndarray:
    """A flat array for decoded words, in memory from numpy's allocator (glibc's heap, which reuses what was
    freed) but advised against transparent huge pages, as ``torch.load``'s tensors are.

    numpy gives arrays of 4 MiB and more ``madvise(MADV_HUGEPAGE)``; where memory is fragmented, the kernel then
    compacts memory on the faults that fill them. Measured here on passes keeping every checkpoint of the
    benchmark run (2 GB of fresh arrays a pass, alternating): numpy's advice 1.41-5.62 s (1.54-6.86 s in another
    run), advised back 1.50-1.91 s. A private anonymous mapping of its own per array avoids the advice too, but
    gives the memory back to the kernel when freed, and on this virtual machine getting it again stalled passes
    for 6.8-8.5 s."""
    out = np.empty(size, dtype=dtype)
    if out.nbytes >= HUGE_BYTES:
        _no_huge_pages(out)
    return out


def _no_huge_pages(a: np.ndarray) -> None:
    """``madvise(MADV_NOHUGEPAGE)`` over the whole pages of ``a`` (Linux; elsewhere, or without libc, nothing)."""
    global _madvise
    if _MADV_NOHUGEPAGE is None:
        return
    if _madvise is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if _madvise is False:
        return
    page = mmap.PAGESIZE
    lo = -(-a.ctypes.data // page) * page
    hi = (a.ctypes.data + a.nbytes) // page * page
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_NOHUGEPAGE)  # (advice: a failure changes nothing but the page size)


def _sole_owner_count() -> int:
    """What ``sys.getrefcount`` says of an array only a local name holds (the interpreter's own count varies by
    version: measured once, the way :meth:`BufferPool.take` asks)."""
    probe = np.empty(1)
    return sys.getrefcount(probe)


_SOLE = _sole_owner_count()


class BufferPool:
    """Buffers of at least ``min_bytes`` lent to callers, taken back when they let go. It keeps at most twice
    what one round lent (:meth:`end_round`: an in-order read ends one per checkpoint; its kept delta bases come
    back too once no later checkpoint needs them), so memory stays bounded by two checkpoints' large tensors
    however many buffers come back."""

    def __init__(self, *, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self.max_bytes = 0  # twice the most one round lent
        self._round = 0
        self._free: dict[tuple[str, int], list[np.ndarray]] = {}
        self._held = 0
        self._lock = threading.Lock()
        self.reused = 0  # buffers handed out again (for tests and benchmarks)

    def take(self, dtype: np.dtype, size: int) -> np.ndarray | None:
        """A flat array of ``size`` elements of ``dtype`` (contents undefined): a returned one nobody else holds,
        or fresh memory; None below ``min_bytes`` (not worth pooling)."""
        nbytes = dtype.itemsize * size
        if nbytes < self.min_bytes:
            return None
        key = (dtype.str, size)
        while True:
            with self._lock:
                stack = self._free.get(key)
                if not stack:
                    break
                buf = stack.pop()
                self._held -= nbytes
            if sys.getrefcount(buf) <= _SOLE:  # only this name: nobody kept its base
                self.reused += 1
                return buf
        return fresh_words(dtype, size)

    def lend(self, buf: np.ndarray) -> np.ndarray:
        """The array to hand out, over ``buf``'s memory; ``buf`` comes back to the pool when it and everything
        made from it (numpy views, torch tensors) are gone (a weakref callback: no cost on the way out)."""
        # Not ``buf.view()``: numpy gives every view made from a view the array owning the memory as its base, so
        # a view of ``buf`` can die while arrays made from it still read the memory. An array over a memoryview
        # is the base of every array made from it (numpy stops at an array whose base is not an array): it dies
        # last.
        view = np.frombuffer(memoryview(buf), dtype=buf.dtype)  # type: ignore[arg-type]
        weakref.finalize(view, _give_back, weakref.ref(self), buf).atexit = False
        with self._lock:
            self._round += buf.nbytes
        return view

    def end_round(self) -> None:
        """One round of lending is over (an in-order read: a checkpoint handed out): keep up to twice its bytes."""
        with self._lock:
            self.max_bytes = max(self.max_bytes, 2 * self._round)
            self._round = 0

    def give_back(self, buf: np.ndarray) -> None:
        """Return a flat buffer nobody else uses any more (taken but not handed out, or the caller's own)."""
        nbytes = buf.nbytes
        if nbytes < self.min_bytes or buf.ndim != 1 or not buf.flags.c_contiguous or not buf.flags.writeable:
            return
        with self._lock:
            if self._held + nbytes > self.max_bytes:
                return
            self._free.setdefault((buf.dtype.str, buf.size), []).append(buf)
            self._held += nbytes


def _give_back(pool: weakref.ref[BufferPool], buf: np.ndarray) -> None:
    p = pool()
    if p is not None:  # (the read that lent it has ended: the memory goes back to the allocator)
        p.give_back(buf)
