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

import sys
import threading
import weakref

import numpy as np

__all__ = ["BufferPool"]


class BufferPool:
    """Buffers of at least ``min_bytes`` lent to callers, taken back when they let go. It keeps at most what one
    round lent (:meth:`end_round`: an in-order read ends one per checkpoint), so memory stays bounded by one
    checkpoint however many buffers of other sizes come back."""

    def __init__(self, *, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self.max_bytes = 0  # the most one round lent
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
            if sys.getrefcount(buf) <= 2:  # this name and the call's argument: nobody kept its base
                self.reused += 1
                return buf
        return np.empty(size, dtype=dtype)

    def lend(self, buf: np.ndarray) -> np.ndarray:
        """The array to hand out, over ``buf``'s memory; ``buf`` comes back to the pool when it and everything
        made from it (numpy views, torch tensors) are gone (a weakref callback: no cost on the way out)."""
        # Not ``buf.view()``: numpy gives every view made from a view the array owning the memory as its base, so
        # a view of ``buf`` can die while arrays made from it still read the memory. An array over a memoryview
        # is the base of every array made from it (numpy stops at an array whose base is not an array): it dies
        # last.
        view = np.frombuffer(memoryview(buf), dtype=buf.dtype)  # type: ignore[arg-type]
        weakref.finalize(view, _give_back, weakref.ref(self), buf)
        with self._lock:
            self._round += buf.nbytes
        return view

    def end_round(self) -> None:
        """One round of lending is over (an in-order read: a checkpoint handed out): keep up to its bytes."""
        with self._lock:
            self.max_bytes = max(self.max_bytes, self._round)
            self._round = 0

    def give_back(self, buf: np.ndarray) -> None:
        """Return a buffer taken but not handed out."""
        nbytes = buf.nbytes
        with self._lock:
            if self._held + nbytes > self.max_bytes:
                return
            self._free.setdefault((buf.dtype.str, buf.size), []).append(buf)
            self._held += nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0


def _give_back(pool: weakref.ref[BufferPool], buf: np.ndarray) -> None:
    p = pool()
    if p is not None:  # (the read that lent it has ended: the memory goes back to the allocator)
        p.give_back(buf)
