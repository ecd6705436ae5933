"""Async saves: the training loop pays for a consistent snapshot; encoding and the commit run in the background.

:meth:`ckptstore.Store.save_async` validates its arguments, copies every tensor into reusable snapshot buffers
and returns a :class:`SaveHandle`; one worker thread per store then encodes and commits the snapshot exactly as
:meth:`~ckptstore.Store.save` would (the same atomic commit, so a crash loses at most the saves still in flight).

- **Snapshot buffers** are host arrays kept by a :class:`SnapshotPool` and reused by the next save whenever a
  tensor of the same dtype and size comes again (a training loop saves the same shapes every time): copying into
  memory that is already mapped costs a fraction of ``clone()``, which page-faults fresh memory on every save
  (docs/benchmarks.md). Tensors on an accelerator are copied into pinned host buffers (``pin_memory``), then the
  device is synchronized before the call returns; without CUDA the same path falls back to ordinary memory.
- **Back-pressure**: at most ``max_in_flight`` saves are in flight (default 1); a new call waits for a slot
  before it copies anything, so memory stays at ``max_in_flight`` snapshots, never a growing queue.
- **Failures** of a background save are raised by its handle's :meth:`~SaveHandle.result` and, unless the handle
  already reported it, by the next ``save``/``save_async``/``wait``/``close`` of the store.
- **Reads see your writes**: on a thread that called ``save_async``, every other Store method waits for the saves
  in flight first, so the store never looks half-saved to the code that saved. The store's own threads (the
  worker and its encode/decode pools) never wait: they are the ones doing the work.

This module does not import torch; tensors of torch are snapshotted through :mod:`ckptstore.torch` when met.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptstore.codecs.planes import kernels, run_in_background
from ckptstore.errors import CheckpointExistsError, InvalidStateError
from ckptstore.format import tree
from ckptstore.format.manifest import CheckpointInfo

__all__ = ["AsyncSaver", "PreparedSave", "SaveHandle", "SnapshotPool"]

DEFAULT_MAX_IN_FLIGHT = 1


@dataclass
class PreparedSave:
    """A validated save: its checkpoint, the state's skeleton, its leaves (snapshot copies for an async save), the
    metadata as it will be written, and the framework the tensors came from."""

    run: str
    step: int
    skeleton: Any
    leaves: dict[str, tree.Leaf]
    metadata: dict[str, Any]
    framework: str


BufferKey = tuple[str, str, int]  # (kind: "host" | "pinned", dtype, elements)


@dataclass
class SnapshotPool:
    """Host buffers for snapshots, reused between saves by (kind, dtype, number of elements).

    :meth:`take` hands out a free buffer of that key or allocates one; a save's buffers come back with
    :meth:`give_back` once its commit is done. :meth:`trim` (after each snapshot) drops the free buffers the
    snapshot did not use, so the pool holds what the saves in flight use and no more. ``stats`` counts
    ``allocated``/``reused`` buffers and ``pinned`` ones (really pinned, not fallen back)."""

    free: dict[BufferKey, list[Any]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"allocated": 0, "reused": 0, "pinned": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: BufferKey, make: Callable[[], Any]) -> Any:
        with self.lock:
            stack = self.free.get(key)
            if stack:
                self.stats["reused"] += 1
                return stack.pop()
        self.stats["allocated"] += 1
        return make()

    def give_back(self, used: list[tuple[BufferKey, Any]]) -> None:
        with self.lock:
            for key, buf in used:
                self.free.setdefault(key, []).append(buf)

    def trim(self) -> None:
        with self.lock:
            self.free = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the free buffers."""
        with self.lock:
            return sum(int(b.nbytes) for stack in self.free.values() for b in stack)


# ------------------------------------------------------------------------------------------------ snapshots
def _on_accelerator(t: Any) -> bool:
    """Whether a torch tensor lives on a device (a seam: tests take the pinned path on CPU by replacing it)."""
    return not t.is_cpu and t.device.type != "meta"  # meta tensors go on to tensor_to_leaf's clear error


def _pinned_empty(shape: tuple[int, ...], dtype: Any) -> tuple[Any, bool]:
    """An empty host tensor in pinned (page-locked) memory, so the device copies into it by DMA; ordinary memory
    where pinning is impossible (no CUDA here). Returns the tensor and whether it is pinned."""
    import torch

    if torch.cuda.is_available():
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True), True
        except RuntimeError:  # pinning refused (locked-memory limit): ordinary memory still gives a snapshot
            pass
    return torch.empty(shape, dtype=dtype), False


def _synchronize(devices: set[Any]) -> None:
    """Wait for the copies queued on ``devices`` (the current stream of each), so the snapshot is complete."""
    import torch

    for dev in devices:
        if getattr(dev, "type", None) == "cuda":
            torch.cuda.current_stream(dev).synchronize()


_copy_many = getattr(kernels, "copy_many", None)  # None without the C kernels (or an older build of them)
_COPY_CHUNK = 4 << 20  # bytes: large tensors are copied in pieces of this size, shared among the copy threads
_EARLY_COPY_MIN = 1 << 20  # bytes: a tensor this large is handed to the helpers as soon as the walk meets it


class ParallelCopy:
    """``np.copyto(dst, src)`` of many arrays on several threads: the caller and ``threads - 1`` of ``helpers``.

    :meth:`add` queues a copy cut into chunks; a large one also wakes a helper, which starts copying while the
    caller goes on (an async save keeps walking its state). :meth:`finish` has the caller copy what is still
    queued alongside the helpers, then waits for them. Each thread takes a batch of queued copies at a time and
    copies it under one release of the GIL (the ``copy_many`` kernel): a thread that took the GIL back after every
    array would wait, for each, until the caller's Python let go of it (up to the switch interval, 5 ms). While the
    caller walks its state it lets go of the GIL after queuing each large tensor, and a helper waiting for it takes
    everything queued; once the caller copies too, batches shrink with what is left,
    so both threads finish together. Two threads copy about 1.5x as fast as one here (docs/benchmarks.md, async
    saves): the snapshot is the whole stall."""

    def __init__(self, helpers: ThreadPoolExecutor | None, threads: int) -> None:
        self.helpers = helpers if threads > 1 else None
        self.threads = threads
        self.queue: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()
        self.queued = 0  # bytes in the queue
        self.lock = threading.Lock()
        self.finishing = False  # the caller copies too: take a share, not everything
        self.running: list[Future[None]] = []

    def add(self, dst: np.ndarray, src: np.ndarray) -> None:
        if self.helpers is None or dst.nbytes <= _COPY_CHUNK:
            pieces = [(dst, src)]
        else:
            d, s = dst.view(np.uint8), src.view(np.uint8)  # both flat and contiguous: bytes are bytes
            pieces = [(d[i : i + _COPY_CHUNK], s[i : i + _COPY_CHUNK]) for i in range(0, d.nbytes, _COPY_CHUNK)]
        with self.lock:
            self.queue.extend(pieces)
            self.queued += dst.nbytes
        if self.helpers is not None and dst.nbytes >= _EARLY_COPY_MIN:
            if len(self.running) < self.threads - 1:
                self.running.append(self.helpers.submit(self._drain))
            # Let go of the GIL for a moment: a helper waiting for it (to start, or for its next batch) takes
            # what is queued and copies it while this thread walks on. Without this it waits until the
            # interpreter's switch interval (5 ms), longer than the whole walk of a 350-tensor state.
            time.sleep(0)

    def _take(self) -> list[tuple[np.ndarray, np.ndarray]]:
        with self.lock:
            # everything while the caller only walks; a shrinking share once it copies too
            share = max(_COPY_CHUNK, self.queued // (2 * self.threads)) if self.finishing else self.queued
            batch: list[tuple[np.ndarray, np.ndarray]] = []
            taken = 0
            while self.queue and taken < share:
                pair = self.queue.popleft()
                batch.append(pair)
                taken += pair[0].nbytes
            self.queued -= taken
            return batch

    def _drain(self) -> None:
        while batch := self._take():
            if _copy_many is not None:
                _copy_many(batch)
            else:
                for dst, src in batch:
                    np.copyto(dst, src)

    def finish(self) -> None:
        with self.lock:
            self.finishing = True
        try:
            self._drain()
        finally:
            for f in self.running:
                f.result()
            self.running = []

    def wait(self) -> None:
        """Wait for the helpers without copying (a failed snapshot gives its buffers back only after this)."""
        with self.lock:
            self.queue.clear()
            self.queued = 0
        for f in self.running:
            f.exception()
        self.running = []


class _Snapshot:
    """One save's copy of a state: flattens it and copies every tensor into buffers from ``pool`` (on
    ``threads`` threads, ``threads - 1`` of them from ``helpers``)."""

    def __init__(self, pool: SnapshotPool, helpers: ThreadPoolExecutor | None = None, threads: int = 1) -> None:
        self.pool = pool
        self.copies = ParallelCopy(helpers, threads)
        self.early: dict[int, Any] = {}  # id(leaf) -> its buffer, for the tensors already queued for copying
        self.used: list[tuple[BufferKey, Any]] = []
        self.copied: set[int] = set()  # ids of leaves that already are snapshot copies (device tensors)
        self.devices: set[Any] = set()
        self._torch: Any = None  # ckptstore.torch, once a torch tensor is met

    def foreign(self, value: Any) -> tree.Leaf | None:
        """tree.flatten's converter: device tensors go straight into pinned buffers (never through ``.cpu()``,
        which would allocate a fresh copy); everything else is converted as usual and copied afterwards."""
        if not type(value).__module__.startswith("torch"):
            return tree.foreign_leaf(value)
        if self._torch is None:
            from ckptstore import torch as ckpt_torch

            self._torch = ckpt_torch
        if not isinstance(value, self._torch.torch.Tensor):
            return tree.foreign_leaf(value)
        tensor_to_leaf = self._torch.tensor_to_leaf
        if _on_accelerator(value):
            t = value.detach()
            shape = tuple(int(s) for s in t.shape)
            key: BufferKey = ("pinned", str(t.dtype), int(t.numel()))

            def make() -> Any:
                buf, pinned = _pinned_empty((key[2],), t.dtype)
                self.pool.stats["pinned"] += int(pinned)
                return buf

            buf = self.pool.take(key, make)
            self.used.append((key, buf))
            view = buf.view(shape)
            view.copy_(t, non_blocking=bool(buf.is_pinned()))
            self.devices.add(t.device)
            leaf: tree.Leaf = tensor_to_leaf(view)
            self.copied.add(id(leaf))
            return leaf
        out: tree.Leaf = tensor_to_leaf(value)  # a view of the caller's memory, copied into a snapshot buffer
        if out.data.nbytes >= _EARLY_COPY_MIN:  # large: the helpers start copying it while the walk goes on
            self.early[id(out)] = self._buffer(out.data)
        return out

    def _buffer(self, data: np.ndarray) -> np.ndarray:
        """A snapshot buffer for ``data`` (flat and contiguous), its copy queued."""
        key: BufferKey = ("host", data.dtype.str, int(data.size))
        buf = self.pool.take(key, lambda: np.empty(key[2], data.dtype))
        self.used.append((key, buf))
        self.copies.add(buf, data)
        return buf

    def flatten(self, state: Any) -> tuple[Any, dict[str, tree.Leaf]]:
        try:
            skeleton, leaves = tree.flatten(state, foreign=self.foreign)
        except BaseException:
            self.copies.wait()  # the helpers must be done with the buffers before they go back to the pool
            raise
        out: dict[str, tree.Leaf] = {}
        for name, leaf in leaves.items():
            if id(leaf) in self.copied:
                out[name] = leaf
                continue
            buf = self.early.get(id(leaf))
            if buf is None:
                buf = self._buffer(np.ascontiguousarray(leaf.data.reshape(-1)))
            out[name] = tree.Leaf(leaf.dtype, leaf.shape, buf, leaf.framework)
        self.copies.finish()
        if self.devices:
            _synchronize(self.devices)
        self.pool.trim()
        return skeleton, out


# ------------------------------------------------------------------------------------------------ handles
class SaveHandle:
    """A save in flight: :meth:`result` waits for its commit and returns the :class:`CheckpointInfo` (or raises
    the background failure); :meth:`done` tells without waiting. ``stall`` is the seconds the call blocked."""

    def __init__(self, saver: AsyncSaver, run: str, step: int, future: Future[CheckpointInfo]) -> None:
        self._saver = saver
        self.run = run
        self.step = step
        self._future = future
        self.stall = 0.0

    @property
    def ref(self) -> str:
        return f"{self.run}@{self.step}"

    def __repr__(self) -> str:
        return f"SaveHandle({self.ref!r}, done={self.done()})"

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        try:
            return self._future.result(timeout)
        except Exception:
            if self._future.done():
                self._saver._reported(self)
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._future.exception(timeout)
        if exc is not None:
            self._saver._reported(self)
        return exc


class AsyncSaver:
    """The async-save machinery of one Store: snapshot pool, the slots of ``max_in_flight``, the worker thread
    and the first unreported failure. ``commit(prepared, progress)`` is the store's own commit of a prepared save,
    run on the worker thread."""

    def __init__(
        self, commit: Callable[[PreparedSave, Any], CheckpointInfo], *, max_in_flight: int = 1, copy_threads: int = 1
    ) -> None:
        if int(max_in_flight) < 1:
            raise InvalidStateError(f"max_in_flight must be at least 1, not {max_in_flight!r}")
        self.max_in_flight = int(max_in_flight)
        self._commit = commit
        self.pool = SnapshotPool()
        self._cond = threading.Condition()
        self._pending: dict[tuple[str, int], SaveHandle] = {}
        self._failure: tuple[SaveHandle, BaseException] | None = None
        self._local = threading.local()
        self._clients: set[int] = set()  # threads that called submit(): they read their own writes
        self._executor: ThreadPoolExecutor | None = None
        self._copy_threads = max(1, int(copy_threads))
        self._copier: ThreadPoolExecutor | None = None  # the snapshot's other copy threads (copy_threads > 1)

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def on_worker(self) -> bool:
        return bool(getattr(self._local, "worker", False))

    def pending(self, run: str, step: int) -> bool:
        return (run, step) in self._pending

    def settle(self) -> None:
        """Before a read or write of the store: a thread that submitted saves waits for them."""
        if self._pending and threading.get_ident() in self._clients:
            self.wait_idle()

    def wait_idle(self) -> None:
        """Wait until no save is in flight (at once on the worker thread, which would wait for itself)."""
        if not self._pending or self.on_worker():
            return
        with self._cond:
            while self._pending:
                self._cond.wait()

    def raise_failure(self) -> None:
        """Raise the first background failure no one has seen yet (then forget it)."""
        with self._cond:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure[1]

    def _reported(self, handle: SaveHandle) -> None:
        with self._cond:
            if self._failure is not None and self._failure[0] is handle:
                self._failure = None

    # ------------------------------------------------------------------ submitting
    def submit(
        self,
        run: str,
        step: int,
        prepare: Callable[[Callable[[Any], tuple[Any, dict[str, tree.Leaf]]]], PreparedSave],
        exists: Callable[[str, int], bool],
        *,
        progress: Any = None,
        on_commit: Callable[[CheckpointInfo], None] | None = None,
    ) -> SaveHandle:
        """Wait for a slot, snapshot through ``prepare(flatten)`` (which validates), and queue the commit."""
        t0 = time.perf_counter()
        if self.on_worker():
            raise InvalidStateError("save_async was called from the store's own background thread",
                                    hint="call it from the training loop, not from an on_commit callback")  # fmt: skip
        self._clients.add(threading.get_ident())
        self.raise_failure()
        with self._cond:
            while len(self._pending) >= self.max_in_flight:
                self._cond.wait()
        self.raise_failure()  # the save we waited for may have failed
        if (run, step) in self._pending or exists(run, step):
            raise CheckpointExistsError(f"checkpoint {run}@{step} already exists", ref=f"{run}@{step}",
                                        hint="delete it first (`ckpt rm`) or save under another step")  # fmt: skip
        if self._copier is None and self._copy_threads > 1:
            self._copier = ThreadPoolExecutor(self._copy_threads - 1, thread_name_prefix="ckpt-snapshot-copy")
        snap = _Snapshot(self.pool, self._copier, self._copy_threads)
        try:
            prepared = prepare(snap.flatten)
        except BaseException:
            self.pool.give_back(snap.used)
            raise
        fut: Future[CheckpointInfo] = Future()
        handle = SaveHandle(self, run, step, fut)
        with self._cond:
            self._pending[(run, step)] = handle
        if self._executor is None:
            # Non-daemon: at interpreter exit the queued saves still finish (concurrent.futures joins its threads).
            # The worker codes at a lower CPU priority than the caller (run_in_background): training runs first.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckpt-async-save", initializer=run_in_background)
        self._executor.submit(self._run, handle, prepared, snap, progress, on_commit)
        handle.stall = time.perf_counter() - t0
        return handle

    def _run(
        self,
        handle: SaveHandle,
        prepared: PreparedSave,
        snap: _Snapshot,
        progress: Any,
        on_commit: Callable[[CheckpointInfo], None] | None,
    ) -> None:
        self._local.worker = True
        fut = handle._future
        committed = False
        try:
            info = self._commit(prepared, progress)
            committed = True
            if on_commit is not None:
                on_commit(info)
        except BaseException as exc:
            what = "its on_commit callback failed after the commit" if committed else "it was not saved"
            exc.add_note(f"raised by the background save of {handle.ref}: {what}")
            with self._cond:
                if self._failure is None:
                    self._failure = (handle, exc)
            fut.set_exception(exc)
            self._finish(handle, prepared, snap)
            if not isinstance(exc, Exception):
                raise
        else:
            fut.set_result(info)  # before the slot frees: once wait_idle() returns, every handle is done
            self._finish(handle, prepared, snap)

    def _finish(self, handle: SaveHandle, prepared: PreparedSave, snap: _Snapshot) -> None:
        prepared.leaves = {}  # the store keeps no reference to snapshot memory past its commit
        self.pool.give_back(snap.used)
        with self._cond:
            self._pending.pop((handle.run, handle.step), None)
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Wait for the saves in flight and stop the worker thread."""
        self.wait_idle()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None
