"""The Store: save, load, list, delete, thin, gc and verify checkpoints of training runs.

Writes are planned first (hash every tensor; reuse identical objects; pick a delta base), then executed: objects
stream into one pack file per save, and the manifest — which lists every object the checkpoint needs with its
location — is committed last and atomically. A checkpoint exists only once its manifest exists, so a crash at any
point leaves the committed checkpoints as they were. See docs/format.md for the bytes.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import json
import logging
import os
import threading
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

from ckptstore import codecs
from ckptstore.asyncsave import DEFAULT_MAX_IN_FLIGHT, AsyncSaver, PreparedSave, SaveHandle
from ckptstore.buffers import BufferPool, fresh_words
from ckptstore.codecs import native
from ckptstore.codecs.planes import estimate_bits, run_in_background, thread_initializer
from ckptstore.codecs.planner import delta_base
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    ConcurrentCommitError,
    FormatError,
    IntegrityError,
    InvalidStateError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    TensorNotFoundError,
    UnsupportedVersionError,
)
from ckptstore.format import dtypes, sharded, tree
from ckptstore.format import parts as _parts
from ckptstore.format.manifest import (
    MAX_CHAIN,
    CheckpointInfo,
    Manifest,
    ManifestCache,
    json_bytes,
    manifest_bytes,
    manifest_key,
    object_id,
    parse_manifest,
    run_lock_key,
    share_equal_lists,
    with_true_depths,
)
from ckptstore.format.names import check_run_name, check_step, check_tensor_name
from ckptstore.format.pack import PackWriter, check_pack_key, copy_spans, new_pack_key, pack_header, repacked_key
from ckptstore.format.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_KIND,
    MAX_MANIFEST_BYTES,
    PACK_HEADER_SIZE,
    PACKS_DIR,
    RUNS_DIR,
    STORE_FILE,
)
from ckptstore.metadata import validate as validate_metadata
from ckptstore.refs import Ref, parse_ref, resolve
from ckptstore.storage import Storage, open_storage

DEFAULT_KEYFRAME_INTERVAL = 4  # chains of at most 4 objects: docs/benchmarks.md weighs this against size
DEFAULT_LEVEL = codecs.DEFAULT_LEVEL
# "dense": every save delta-codes against its predecessor. "hot": a save writes its changed tensors raw (one
# object per tensor, the fastest read), and compaction re-encodes them densely once they are no longer newest.
LAYOUTS = ("dense", "hot")
DEFAULT_LAYOUT = "dense"  # a store whose ckptstore.json records no layout was written dense

log = logging.getLogger("ckptstore.store")


def store_settings(info: Mapping[str, Any]) -> dict[str, Any]:
    """The write settings a store records in ckptstore.json (format §3); a store written before they were
    recorded has none, and reads with the defaults it was written with."""
    given = info.get("settings") or {}
    # found by fuzzing: a list, a string, NaN or 1e400 here raised AttributeError/ValueError/OverflowError
    ints = ("keyframe_interval", "zstd_level")
    if not isinstance(given, dict) or any(
        k in given and (isinstance(given[k], bool) or not isinstance(given[k], int)) for k in ints
    ):
        raise FormatError(f"{STORE_FILE} holds invalid settings {str(given)[:200]!r}")
    out: dict[str, Any] = {
        "keyframe_interval": int(given.get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL)),
        "zstd_level": int(given.get("zstd_level", DEFAULT_LEVEL)),
        "codec": str(given.get("codec", codecs.DEFAULT_BYTES_CODEC)),
        "layout": str(given.get("layout", DEFAULT_LAYOUT)),
    }
    if out["keyframe_interval"] < 1 or not 1 <= out["zstd_level"] <= 22 or out["layout"] not in LAYOUTS:
        raise FormatError(f"{STORE_FILE} holds invalid settings {given!r}")
    return out


_WINDOW = 4  # tensors being encoded ahead of the writer, per worker
# A hot save (layout "hot") codes a tensor as a keyframe only when it is at least this large and its byte planes'
# entropy estimate promises at most half its size (AdamW moments of never-seen token rows are mostly zeros), and
# keeps the result only below this fraction of the raw size: everything else is written raw, the fastest to read.
HOT_MIN_BYTES = 1 << 16
HOT_MAX_RATIO = 0.6


def _compresses_well(words: np.ndarray) -> bool:
    return words.nbytes >= HOT_MIN_BYTES and estimate_bits(words) < 0.5 * 8 * words.dtype.itemsize


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """A store of training runs. Open one with :func:`open_store` or create it with :func:`create_store`.

    ``threads``: how many tensors are encoded or decoded at once (default 2); each large tensor is itself coded
    in chunks on the process's coding threads (one per core it may use; ``CKPTSTORE_CODING_THREADS`` or
    ``ckptstore.codecs.planes.set_coding_threads`` change that). ``keyframe_interval`` bounds delta chains: a
    tensor is stored whole at least every that many checkpoints, so reading any checkpoint decodes at most that
    many objects per tensor.
    The Store keeps a private copy of the last checkpoint it saved (about one checkpoint of memory), so the
    next save deltas against it without reading it back. ``max_in_flight`` bounds the :meth:`save_async` saves
    in flight (each holds one snapshot of its state).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        threads: int | None = None,
        keyframe_interval: int | None = None,
        level: int | None = None,
        layout: str | None = None,
        compaction: str | None = None,
        lock_wait: float = 0.0,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.storage = storage
        self.lock_wait = float(lock_wait)  # seconds a writer waits for a held lock (0: fail at once)
        self.threads = threads or min(2, os.cpu_count() or 1)
        self.info = self._read_store_file()
        # The store's recorded settings, unless this process overrides them (then only for its own writes).
        self.settings = store_settings(self.info)
        kf = self.settings["keyframe_interval"] if keyframe_interval is None else keyframe_interval
        self.keyframe_interval = max(1, int(kf))
        self.level = self.settings["zstd_level"] if level is None else int(level)
        self.codec: str = self.settings["codec"]  # the bytes codec ending every chain this Store writes
        self.layout: str = self.settings["layout"] if layout is None else str(layout)
        if self.layout not in LAYOUTS:
            raise InvalidStateError(f"unknown layout {layout!r}", hint=f"use one of {', '.join(LAYOUTS)}")
        # "background": after each hot save, a thread compacts the checkpoints that are no longer newest;
        # "manual": only Store.compact / `ckpt compact` do.
        self.compaction = compaction or ("background" if self.layout == "hot" else "manual")
        if self.compaction not in ("background", "manual"):
            raise InvalidStateError(f"unknown compaction {compaction!r}", hint="use 'background' or 'manual'")
        self.compaction_error: BaseException | None = None  # the last background compaction's failure, if any
        self._compactor: ThreadPoolExecutor | None = None
        self._compact_pending: set[str] = set()
        # Words of the checkpoint compacted last (run, step, object id -> words): the delta bases of the next one.
        self._compact_head: tuple[str, int, dict[str, np.ndarray]] | None = None
        # Threads of this process (a background compaction, an async save) queue here; processes on the store lock.
        self._thread_lock = threading.Lock()
        # Private copies of the words of the last checkpoint this Store saved: the delta bases of the next save,
        # so a training loop never reads its own checkpoints back. About one checkpoint of memory.
        self._head: dict[str, np.ndarray] = {}
        self._manifests = ManifestCache()
        self._saver = AsyncSaver(self._commit_prepared, max_in_flight=max_in_flight, copy_threads=self.threads)

    # ------------------------------------------------------------------ opening
    def _read_store_file(self) -> dict[str, Any]:
        try:
            raw = self.storage.read(STORE_FILE)
        except (FileNotFoundError, OSError):
            raise StoreNotFoundError(
                "no ckptstore store here", path=self.storage.url, hint="create one with `ckpt init PATH`"
            ) from None
        try:
            info = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep (found by fuzzing)
            raise FormatError(f"{STORE_FILE} is not JSON", path=self.storage.url) from None
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            raise FormatError(f"{STORE_FILE} does not describe a ckptstore store", path=self.storage.url)
        version = info.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):  # found by fuzzing: was ValueError/TypeError
            raise FormatError(f"{STORE_FILE} has a version {str(version)[:40]!r}, not a number", path=self.storage.url)
        if version > FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"store format {info['version']} is newer than {FORMAT_VERSION}",
                path=self.storage.url,
                hint="upgrade ckptstore",
            )
        return info

    @property
    def url(self) -> str:
        return self.storage.url

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # the body's error comes first; the saves in flight still finish
            with contextlib.suppress(Exception):
                self.close()
            return
        self.close()

    def close(self) -> None:
        """Wait for the saves in flight (raising the first background failure not yet reported) and for the
        background compaction, then close."""
        try:
            self.wait()
            self.wait_compaction()
        finally:
            self._saver.shutdown()
            self._head = {}
            self._compact_head = None
            self.storage.close()

    def wait(self) -> None:
        """Wait for the :meth:`save_async` saves in flight; raise the first background failure not yet reported."""
        self._saver.wait_idle()
        self._saver.raise_failure()

    def _settle(self) -> None:
        # The thread that called save_async reads its own writes: it waits for the saves in flight.
        self._saver.settle()

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """The store-wide lock (gc, repack, archive, compaction's gc): exclusive against every writer of every run.
        Threads of this Store (background compaction, async saves) queue on an in-process lock first."""
        self._settle()
        with self._thread_lock, self._locked(lambda st: st.enter_context(self.storage.lock(LOCK_FILE))):
            yield

    @contextlib.contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """The store-wide lock shared, no run lock: the ranks of one sharded save write their packs under it, so
        store-wide work (gc, repack) waits for them (docs/format.md §12.3)."""
        self._settle()
        with self._locked(lambda st: st.enter_context(self.storage.lock(LOCK_FILE, shared=True))):
            yield

    @contextlib.contextmanager
    def _run_lock(self, *runs: str) -> Iterator[None]:
        """The lock of a write that touches only ``runs`` (save, delete, thin, metadata edits): the store-wide
        lock shared, then each run's lock (``runs/RUN/.lock``) exclusive, so writers of different runs go on at
        once and two writers of one run do not; gc and repack wait for all of them (docs/format.md §12.3)."""

        def take(st: contextlib.ExitStack) -> None:
            try:
                st.enter_context(self.storage.lock(LOCK_FILE, shared=True))
            except StoreLockedError as exc:
                raise StoreLockedError(
                    f"a store-wide operation (gc, repack, archive) holds the store's lock ({exc.message})",
                    path=exc.path,
                    hint="wait for it to finish, or open the store with lock_wait=SECONDS (`--lock-wait`)",
                ) from None
            for run in sorted(set(runs)):
                try:
                    st.enter_context(self.storage.lock(run_lock_key(run)))
                except StoreLockedError as exc:
                    raise StoreLockedError(
                        f"another writer is writing run {run!r}",
                        path=exc.path,
                        hint="two jobs must not write the same run; wait for the other one, or open the store "
                        "with lock_wait=SECONDS (`--lock-wait`) to wait for it",
                    ) from None

        self._settle()
        with self._thread_lock, self._locked(take):
            yield

    @contextlib.contextmanager
    def _locked(self, take: Callable[[contextlib.ExitStack], None]) -> Iterator[None]:
        deadline = time.monotonic() + self.lock_wait
        pause = 0.02
        while True:
            with contextlib.ExitStack() as st:
                try:
                    take(st)
                except StoreLockedError:
                    if time.monotonic() + pause > deadline:
                        raise
                    st.close()
                    time.sleep(pause)
                    pause = min(0.5, pause * 1.5)
                    continue
                yield
                return

    # ------------------------------------------------------------------ listing
    def runs(self) -> list[str]:
        self._settle()
        names = set()
        for key in self.storage.list(RUNS_DIR):
            parts = key.split("/")
            if len(parts) == 4 and parts[2] == "ckpt" and parts[3].endswith(".json"):
                names.add(parts[1])
        return sorted(names)

    def steps(self, run: str) -> list[int]:
        check_run_name(run)
        self._settle()
        out = []
        for key in self.storage.list(f"{RUNS_DIR}/{run}/ckpt"):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                out.append(int(name[:-5]))
        return sorted(out)

    def manifest(self, run: str, step: int) -> Manifest:
        self._settle()
        cached = self._manifests.get((run, step))
        if cached is not None:
            return cached
        key = manifest_key(run, step)
        try:
            raw = self.storage.read(key)
        except (FileNotFoundError, OSError):
            raise CheckpointNotFoundError(f"no checkpoint {run}@{step}", ref=f"{run}@{step}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FormatError("manifest larger than the format's limit", path=key)
        m = Manifest(parse_manifest(bytes(raw), key), key)
        share_equal_lists(m.data)
        self._manifests[(run, step)] = m
        return m

    def _metadata_of(self, run: str, step: int) -> dict[str, Any]:
        """A checkpoint's metadata, without parsing its manifest again if this Store has seen it."""
        meta = self._manifests.metadata((run, step))
        return meta if meta is not None else self.manifest(run, step).metadata

    def checkpoints(self, run: str | None = None) -> list[CheckpointInfo]:
        """Checkpoints in step order; ``stored_bytes`` counts the objects each one added to the store (the
        first checkpoint in step order that references an object owns it), so a run's rows sum to its size."""
        out = []
        for r in [run] if run is not None else self.runs():
            seen: set[tuple[str, int]] = set()
            for s in self.steps(r):
                m = self.manifest(r, s)
                info = m.info()
                own = 0
                for rec in m.objects.values():
                    loc = (rec["pack"], int(rec["offset"]))
                    if loc not in seen:
                        seen.add(loc)
                        own += int(rec["length"])
                info.stored_bytes = own
                out.append(info)
        return out

    def resolve(self, ref: str | Ref) -> Manifest:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        steps = self.steps(r.run)
        if r.kind == "step":
            entries = [{"step": s, "metadata": {}} for s in steps]
        elif r.kind in ("latest", "first"):
            entries = [{"step": s} for s in steps]
        else:
            entries = [{"step": s, "metadata": self._metadata_of(r.run, s)} for s in steps]
        step = resolve(r, entries)
        return self.manifest(r.run, step)

    # ------------------------------------------------------------------ saving
    def save(
        self,
        run: str,
        step: int,
        state: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> CheckpointInfo:
        """Store ``state`` (nested dicts/lists of tensors and plain values) as checkpoint ``run@step``."""
        self.wait()  # earlier async saves commit first, and a failure among them is raised here
        return self._commit_prepared(self._prepare(run, step, state, metadata, tree.flatten), progress)

    def save_async(
        self,
        run: str,
        step: int,
        state: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        on_commit: Callable[[CheckpointInfo], None] | None = None,
    ) -> SaveHandle:
        """:meth:`save` in the background: returns once every tensor of ``state`` is copied into snapshot buffers
        (so the caller may change them in place at once), then encodes and commits on a worker thread.

        Arguments are validated here, and errors raised here. With ``max_in_flight`` saves in flight the call
        first waits for one to finish. The handle's ``result()`` gives the :class:`CheckpointInfo` or raises the
        background failure, which the next ``save``/``save_async``/``wait``/``close`` also raises unless the handle
        reported it. ``on_commit(info)`` and ``progress`` run on the worker thread. See docs/design.md (async saves).
        """
        check_run_name(run)
        check_step(step)

        def exists(r: str, s: int) -> bool:
            # with saves still in flight (max_in_flight > 1) listing would wait for them: the commit checks again
            return (r, s) in self._manifests or (not self._saver.in_flight and s in self.steps(r))

        return self._saver.submit(
            run,
            step,
            lambda flatten: self._prepare(run, step, state, metadata, flatten),
            exists,
            progress=progress,
            on_commit=on_commit,
        )

    def _prepare(
        self,
        run: str,
        step: int,
        state: Any,
        metadata: Mapping[str, Any] | None,
        flatten: Callable[[Any], tuple[Any, dict[str, tree.Leaf]]],
    ) -> PreparedSave:
        """Validate a save and flatten its state (plain values are copied into the skeleton here, at call time)."""
        check_run_name(run)
        check_step(step)
        skeleton, leaves = flatten(state)
        for name in leaves:
            check_tensor_name(name)
        meta = validate_metadata(metadata)  # docs/metadata.md; refuse bad metadata before touching the store
        meta_bytes = json_bytes(meta)
        framework = "torch" if any(lf.framework == "torch" for lf in leaves.values()) else "numpy"
        return PreparedSave(run, step, skeleton, leaves, json.loads(meta_bytes), framework)

    def _commit_prepared(self, p: PreparedSave, progress: Callable[[int, int], None] | None) -> CheckpointInfo:
        with self._run_lock(p.run):
            steps = self.steps(p.run)
            if p.step in steps:
                raise CheckpointExistsError(
                    f"checkpoint {p.run}@{p.step} already exists",
                    ref=f"{p.run}@{p.step}",
                    hint="delete it first (`ckpt rm`) or save under another step",
                )
            earlier = [s for s in steps if s < p.step]
            if earlier:  # read afresh: a compaction elsewhere may have moved its objects
                self._manifests.pop((p.run, earlier[-1]), None)
            base = self.manifest(p.run, earlier[-1]) if earlier else None
            manifest = self._write_checkpoint(
                p.run, p.step, p.skeleton, p.leaves, base, p.metadata, p.framework, progress
            )
        if self.layout == "hot" and self.compaction == "background":
            self._schedule_compaction(p.run)
        return manifest.info()

    def _write_checkpoint(
        self,
        run: str,
        step: int,
        skeleton: Any,
        leaves: dict[str, tree.Leaf],
        base: Manifest | None,
        metadata: dict[str, Any],
        framework: str,
        progress: Callable[[int, int], None] | None,
    ) -> Manifest:
        logical = sum(lf.nbytes for lf in leaves.values())
        pack_key = new_pack_key(run, step)
        hot = self.layout == "hot"
        tensors, objects, wrote, stored, new_head = self._write_objects(pack_key, leaves, base, progress, hot=hot)
        data: dict[str, Any] = {
            "kind": MANIFEST_KIND,
            "format_version": FORMAT_VERSION,
            "run": run,
            "step": step,
            "created": _now(),
            "framework": framework,
            "tree": skeleton,
            "tensors": tensors,
            "objects": objects,
            "packs": [pack_key] if wrote else [],
            "stats": {"logical_bytes": logical, "stored_bytes": stored},
            "metadata": metadata,
        }
        if hot:
            data["layout"] = "hot"  # format §4.7: compaction re-encodes this checkpoint's raw objects
        key = manifest_key(run, step)
        try:
            self.storage.create(key, manifest_bytes(data))
        except ConcurrentCommitError:
            if wrote:  # another writer committed run@step first; our pack is referenced by nothing
                self.storage.delete(pack_key)
            raise
        m = Manifest(data, key)
        self._manifests[(run, step)] = m
        self._head = new_head
        return m

    def _write_objects(
        self,
        pack_key: str,
        leaves: Mapping[str, tree.Leaf],
        base: Manifest | None,
        progress: Callable[[int, int], None] | None,
        *,
        hot: bool = False,
        head: dict[str, np.ndarray] | None = None,
        keep_heads: bool = True,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], bool, int, dict[str, np.ndarray]]:
        """Hash ``leaves``, dedup them against ``base`` and encode the new objects into ``pack_key``: the one
        write path of :meth:`save` and :meth:`write_shards`. Returns the manifest's ``tensors`` and ``objects``,
        whether the pack was written, its stored bytes, and the delta heads for the next save (the caller sets
        them once its checkpoint is safe).

        ``hot``: new objects are written raw, and an unchanged tensor reuses the base's record only if that is one
        object (no ``refs``), so reading this checkpoint decodes one object per tensor; no delta heads are kept.
        ``head`` replaces the Store's delta heads as the cache of base words (compaction keeps its own);
        without ``keep_heads`` no copies of the new words are made."""
        names = list(leaves)
        oids = self._object_ids(names, leaves)
        tensors = {
            n: {"dtype": leaves[n].dtype, "shape": list(leaves[n].shape), "object": o}
            for n, o in zip(names, oids, strict=True)
        }
        objects: dict[str, dict[str, Any]] = {}
        todo: list[tuple[str, str]] = []  # (tensor name, object id) to encode, first occurrence of each id
        planned: set[str] = set()
        for n, o in zip(names, oids, strict=True):
            if base is not None and o in base.objects and not (hot and base.objects[o].get("refs")):
                for dep in base.chain(o):
                    objects[dep] = base.objects[dep]
            elif o not in planned:
                planned.add(o)
                todo.append((n, o))
        # unchanged tensors carry their words over; head entries are keyed by content, so they stay right
        heads = self._head if head is None else head
        track = keep_heads and not hot
        new_head = {o: heads[o] for o in oids if o in heads} if track else {}
        stored = 0
        if todo:
            records, stored = self._encode_into_pack(
                pack_key, todo, leaves, base, progress, new_head if track else None, hot=hot, head=head
            )
            for o, rec in records.items():
                objects[o] = rec
                for dep in rec.get("refs", {}).values():
                    if base is not None:
                        for d in base.chain(dep):
                            objects.setdefault(d, base.objects[d])
        return tensors, objects, bool(todo), stored, new_head

    def _object_ids(self, names: list[str], leaves: Mapping[str, tree.Leaf]) -> list[str]:
        """The content address of each tensor, in order: large ones hashed on the pool (xxh3 lets go of the GIL),
        small ones here meanwhile (for those a pool thread's future costs more than the hash)."""
        large = [n for n in names if leaves[n].nbytes >= _INLINE_BYTES]
        if len(large) < 2:
            return [object_id(leaves[n]) for n in names]
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-hash", initializer=thread_initializer()) as ex:
            pooled = {n: ex.submit(object_id, leaves[n]) for n in large}
            here = {n: object_id(leaves[n]) for n in names if n not in pooled}
            return [here[n] if n in here else pooled[n].result() for n in names]

    def _encode_into_pack(
        self,
        pack_key: str,
        todo: list[tuple[str, str]],
        leaves: Mapping[str, tree.Leaf],
        base: Manifest | None,
        progress: Callable[[int, int], None] | None,
        new_head: dict[str, np.ndarray] | None = None,
        *,
        hot: bool = False,
        head: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Encode the new objects in parallel and stream them, in order, into one pack file (``hot``: raw)."""
        records: dict[str, dict[str, Any]] = {}
        total = len(todo)
        heads = self._head if head is None else head
        history = [st for st in self.steps(base.run) if st <= base.step] if base is not None and not hot else []
        # Base objects that other objects' chains pass through: another job may be reading those while decoding,
        # so their head arrays are never overwritten in place.
        referenced = {d for r in base.objects.values() for d in r.get("refs", {}).values()} if base else set()

        def job(item: tuple[str, str]) -> _Encoded:
            name, oid = item
            leaf = leaves[name]
            spec = codecs.TensorSpec(leaf.dtype, leaf.shape)
            words = leaf.words
            if hot:  # the fast layout: one object, raw unless it is mostly redundant (a cheap, fast keyframe then)
                fast: dict[str, Any] = {"dtype": leaf.dtype, "shape": list(leaf.shape), "codecs": [], "depth": 0}
                if _compresses_well(words):
                    enc = codecs.encode(words, spec, None, level=self.level, codec=self.codec)
                    if enc.nbytes < HOT_MAX_RATIO * words.nbytes:
                        return oid, {**fast, "codecs": enc.codecs}, enc.parts
                raw: list[bytes | memoryview] = [np.ascontiguousarray(words).view(np.uint8).data] if words.size else []
                return oid, fast, raw
            refs: dict[str, np.ndarray] = {}
            base_oid = None
            depth = 0
            spare = None  # a head array this job owns once encoded: its memory takes the copy of ``words``
            if base is not None:
                chosen = self._delta_base(name, leaf, base, history)
                if chosen is not None:
                    base_oid, depth = chosen
                    # consumed once: dropping it keeps old head + new head near one checkpoint
                    prev_words = heads.pop(base_oid, None)
                    reusable = new_head is not None and base_oid not in new_head and base_oid not in referenced
                    if prev_words is not None and reusable:
                        spare = prev_words
                    refs["prev"] = prev_words if prev_words is not None else self._decode_chain(base, base_oid)[0]
            enc = codecs.encode(words, spec, refs, level=self.level, codec=self.codec)
            rec: dict[str, Any] = {"dtype": leaf.dtype, "shape": list(leaf.shape), "codecs": enc.codecs}
            if enc.roles and base_oid is not None:
                rec["refs"] = {"prev": base_oid}
                rec["depth"] = depth
            else:
                rec["depth"] = 0
            # Keep a private copy of what was saved as the base for the next save (the caller's tensors may
            # change in place as training goes on).
            if new_head is not None:
                if spare is not None and spare.shape == words.shape and spare.dtype == words.dtype:
                    np.copyto(spare, words)  # reuse pages already mapped: a fresh array costs a page fault per 4 KiB
                    new_head[oid] = spare
                else:
                    new_head[oid] = np.array(words, copy=True)
            return oid, rec, enc.parts

        stored = 0
        with PackWriter(self.storage, pack_key) as writer:
            with ThreadPoolExecutor(
                self.threads, thread_name_prefix="ckpt-encode", initializer=thread_initializer()
            ) as ex:
                window: list[Future[_Encoded] | _Ran[_Encoded]] = []
                it = iter(todo)
                done = 0
                for item in it:
                    if leaves[item[0]].nbytes < _INLINE_BYTES:
                        # a tiny tensor's encode is all Python: on a pool thread it would only trade the GIL,
                        # so this thread does it meanwhile (its result still goes into the pack in order)
                        window.append(_Ran(job, item))
                    else:
                        window.append(ex.submit(job, item))
                    if len(window) >= _WINDOW * self.threads:
                        done = self._drain(window.pop(0), writer, pack_key, records, done, total, progress)
                for fut in window:
                    done = self._drain(fut, writer, pack_key, records, done, total, progress)
            stored = writer.tell
            writer.commit()
        return records, stored

    def _delta_base(self, name: str, leaf: tree.Leaf, base: Manifest, steps: list[int]) -> tuple[str, int] | None:
        """:func:`ckptstore.codecs.planner.delta_base` over the run's manifests (``steps``: the run's steps up to
        and including the base checkpoint)."""

        def object_before(j: int) -> str | None:
            if j + 2 > len(steps):
                return None
            before = self.manifest(base.run, steps[-2 - j]).tensors.get(name)
            return None if before is None else str(before["object"])

        return delta_base(
            name, leaf.dtype, leaf.shape, base.tensors, base.objects, object_before, self.keyframe_interval
        )

    @staticmethod
    def _drain(
        fut: Future[_Encoded] | _Ran[_Encoded],
        writer: PackWriter,
        pack_key: str,
        records: dict[str, dict[str, Any]],
        done: int,
        total: int,
        progress: Callable[[int, int], None] | None,
    ) -> int:
        oid, rec, parts = fut.result()
        rec["pack"] = pack_key
        rec["offset"], rec["length"] = writer.append(parts)
        records[oid] = rec
        if progress is not None:
            progress(done + 1, total)
        return done + 1

    # ------------------------------------------------------------------ sharded saves: many writers, one commit
    def write_shards(
        self, run: str, step: int, leaves: Mapping[str, tree.Leaf], base_step: int | None, *, writer: str
    ) -> dict[str, Any]:
        """Write one writer's tensors (a rank's shards) into a pack of its own; commits nothing.

        Returns ``{"tensors", "objects", "packs", "logical_bytes", "stored_bytes"}``: the part of a manifest this
        writer contributes, for :meth:`commit_shards` on the coordinator. Objects dedup against ``base_step``
        (the previous checkpoint, chosen by the coordinator so every writer sees the same one) and are
        delta-coded against the same tensor name there. Until the commit the pack is an orphan: ``gc`` frees it.
        """
        check_run_name(run)
        check_step(step)
        for name in leaves:
            check_tensor_name(name)
        if not writer.replace("-", "").isalnum():
            raise InvalidStateError(f"writer id {writer!r} must be letters, digits and '-'")
        base = self.manifest(run, base_step) if base_step is not None else None
        pack_key = new_pack_key(run, step, tag=writer)
        # The store-wide lock shared (the ranks of one job write one run at once, so not the run lock): a gc
        # would take this pack, named by no manifest yet, for an orphan. commit_shards checks it is still there.
        with self._shared_lock():
            tensors, objects, wrote, stored, new_head = self._write_objects(pack_key, leaves, base, None)
        # Head entries are keyed by content, so they stay right even if this checkpoint is never committed.
        self._head = new_head
        return {
            "tensors": tensors,
            "objects": objects,
            "packs": [pack_key] if wrote else [],
            "logical_bytes": sum(lf.nbytes for lf in leaves.values()),
            "stored_bytes": stored,
        }

    def commit_shards(
        self,
        run: str,
        step: int,
        parts: Iterable[Mapping[str, Any]],
        skeleton: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Commit one manifest from the parts :meth:`write_shards` returned on every writer (the coordinator's
        job, done last). ``extra`` adds top-level manifest sections (the DCP layout: docs/dcp.md). If the step
        was committed meanwhile (another job writing the same run), raises and frees this save's packs."""
        check_run_name(run)
        check_step(step)
        meta = json.loads(json_bytes(validate_metadata(metadata)))
        tensors: dict[str, dict[str, Any]] = {}
        objects: dict[str, dict[str, Any]] = {}
        packs: list[str] = []
        logical = stored = 0
        for part in parts:
            for n, t in part["tensors"].items():
                if n in tensors and tensors[n] != t:
                    raise FormatError(f"two writers wrote different tensors named {n!r}", path=f"{run}@{step}")
                tensors[n] = t
            objects.update(part["objects"])
            packs.extend(part["packs"])
            logical += int(part["logical_bytes"])
            stored += int(part["stored_bytes"])
        for rec in objects.values():
            check_pack_key(rec.get("pack"), f"{run}@{step}")
        data: dict[str, Any] = {
            "kind": MANIFEST_KIND,
            "format_version": FORMAT_VERSION,
            "run": run,
            "step": step,
            "created": _now(),
            "framework": "torch",
            "tree": skeleton,
            "tensors": tensors,
            "objects": objects,
            "packs": packs,
            "stats": {"logical_bytes": logical, "stored_bytes": stored},
            "metadata": meta,
            **(extra or {}),
        }
        key = manifest_key(run, step)
        with self._run_lock(run):
            try:
                if self.storage.exists(key):
                    raise CheckpointExistsError(
                        f"checkpoint {run}@{step} already exists (another job writing run {run!r}?)",
                        ref=f"{run}@{step}",
                        hint="give each job its own run name or step; this save's packs were freed",
                    )
                # A pack freed between its write and this commit (a gc run by hand meanwhile) would leave a
                # committed checkpoint with missing objects: refuse instead; gc excludes this check (§12.3).
                missing = [p for p in dict.fromkeys(packs) if not self.storage.exists(p)]
                if missing:
                    raise IntegrityError(
                        f"{len(missing)} pack(s) of checkpoint {run}@{step} vanished before its commit "
                        f"(first: {missing[0]}); nothing was committed",
                        ref=f"{run}@{step}",
                        hint="save this checkpoint again; do not run `ckpt gc` while a sharded save is running",
                    )
                self.storage.create(key, manifest_bytes(data))
            except (ConcurrentCommitError, CheckpointExistsError, IntegrityError):
                for p in packs:
                    with contextlib.suppress(FileNotFoundError, OSError):
                        self.storage.delete(p)
                raise
        m = Manifest(data, key)
        self._manifests[(run, step)] = m
        return m

    # ------------------------------------------------------------------ loading
    def _decode_chain(
        self,
        manifest: Manifest,
        oid: str,
        *,
        known: Mapping[str, np.ndarray] | None = None,
        verify: bool = False,
        out: np.ndarray | None = None,
        _depth: int = 0,
    ) -> tuple[np.ndarray, bool]:
        """Decode one object, resolving its delta chain; returns the words and whether the array is private to
        this call (decoded here, not a cached base). ``known`` holds already-decoded objects (the previous
        checkpoint when reading a run in order). With ``verify`` the object itself is decoded and hashed even if
        known; its references may still come from ``known``. A delta whose base is private is decoded into the
        base's memory: a chain of any length then allocates one output instead of one per link. ``out``: flat
        words to decode the object into where no base takes it (a lent buffer, :mod:`ckptstore.buffers`)."""
        if _depth > MAX_CHAIN:
            raise FormatError(
                f"delta chain of object {oid[:20]}… is longer than {MAX_CHAIN} (a cycle?)", path=manifest.key
            )
        if not verify:
            hit = known.get(oid) if known is not None else None
            if hit is None:
                hit = self._head.get(oid)
            if hit is not None:
                return hit, False
        rec = manifest.objects.get(oid)
        if rec is None:
            raise FormatError(f"object {oid} missing from manifest", path=manifest.key)
        spec = codecs.TensorSpec(rec["dtype"], tuple(rec["shape"]))
        refs: dict[str, np.ndarray] = {}
        private: set[str] = set()
        for role, dep in rec.get("refs", {}).items():
            refs[role], owned = self._decode_chain(manifest, dep, known=known, _depth=_depth + 1)
            if owned:
                private.add(role)
        payload = self._payload(manifest, oid, rec)
        try:
            words = codecs.decode(payload, rec["codecs"], spec, refs, reusable=private, out=out)
        except CkptStoreError as exc:
            raise IntegrityError(
                f"object {oid[:20]}… does not decode: {exc}", path=rec.get("pack"), ref=manifest.ref
            ) from None
        except MemoryError:  # a shape no real checkpoint here has: a forged or damaged manifest, or too little memory
            raise IntegrityError(
                f"object {oid[:20]}… of shape {list(spec.shape)[:4]} does not fit in memory",
                path=rec.get("pack"),
                ref=manifest.ref,
                hint="if the checkpoint is real, read it on a machine with more memory; else the manifest is damaged",
            ) from None
        if verify:
            leaf = tree.Leaf(rec["dtype"], spec.shape, words)
            if object_id(leaf) != oid:
                raise IntegrityError(
                    f"object {oid[:20]}… decodes to different bytes",
                    path=rec.get("pack"),
                    ref=manifest.ref,
                    hint="the store is damaged; restore the pack from backup",
                )
        return words, True

    def load_leaves(
        self,
        ref: str | Ref | Manifest,
        names: Iterable[str] | None = None,
        *,
        known: Mapping[str, np.ndarray] | None = None,
        keep: Mapping[str, np.ndarray] | None = None,
        recycle: dict[str, np.ndarray] | None = None,
        buffers: BufferPool | None = None,
    ) -> dict[str, tree.Leaf]:
        """Decode the named tensors (default: every stored tensor), each checked against its content hash. For a
        sharded (DCP) checkpoint a name may also be a *full* tensor of :attr:`Manifest.full_tensors`: its shards
        are decoded and put together bit-exactly, one full tensor at a time (its shards freed once copied).

        ``keep``: a dict (object id -> None) of objects to keep a private copy of: each one decoded is copied into
        it by the decoding thread (the caller may change the arrays it gets; the copies stay as decoded).
        ``recycle``: arrays of ``known`` that the caller lets go of after this call and that exactly one decode
        of this call reads (object id -> array, see :func:`_spent_bases`): a private copy of the object decoded
        from one of them goes into that array once it has been read, instead of into fresh memory. ``buffers``:
        the large tensors handed out are decoded into (or copied to) buffers of this pool and lent from it."""
        m = ref if isinstance(ref, Manifest) else self.resolve(ref)
        names = None if names is None else list(names)
        for _ in range(4):
            try:
                return self._load_leaves(m, names, known, keep, recycle, buffers)
            except IntegrityError:
                # Compaction or gc may have replaced the manifest (same tensors, new objects) and freed the packs
                # this one named: read it again and decode from the new objects alone, never a mix of both.
                fresh = self._reread_manifest(m)
                if fresh is None or fresh.objects == m.objects:
                    raise
                m = fresh
        return self._load_leaves(m, names, known, keep, recycle, buffers)

    def _reread_manifest(self, m: Manifest) -> Manifest | None:
        """The checkpoint's manifest read again (CheckpointNotFoundError if it was deleted meanwhile); None if
        it now describes other tensors."""
        self._manifests.pop((m.run, m.step), None)
        fresh = self.manifest(m.run, m.step)
        return fresh if fresh.tensors == m.tensors else None

    def _load_leaves(
        self,
        m: Manifest,
        names: Iterable[str] | None,
        known: Mapping[str, np.ndarray] | None,
        keep: Mapping[str, np.ndarray] | None = None,
        recycle: dict[str, np.ndarray] | None = None,
        buffers: BufferPool | None = None,
    ) -> dict[str, tree.Leaf]:
        wanted = list(m.tensors) if names is None else list(names)
        full = m.full_tensors if "dcp" in m.data else {}
        for n in wanted:
            if n not in m.tensors and n not in full:
                raise TensorNotFoundError(
                    f"no tensor {n!r}", ref=m.ref, tensor=n, hint=f"`ckpt show {m.ref}` lists the tensors"
                )

        def stored(n: str) -> tree.Leaf:
            t = m.tensors[n]
            out = taken.pop(n, None)
            words, _ = self._decode_chain(m, t["object"], known=known, out=out)
            if out is None or words is out:
                return checked(n, t, words, lent=out is not None)
            # an object already decoded (its copy goes into ``out``), or a path with an array of its own
            return checked(n, t, words, spare=None if np.may_share_memory(words, out) else out)

        def checked(
            n: str, t: Mapping[str, Any], words: np.ndarray, lent: bool = False, spare: np.ndarray | None = None
        ) -> tree.Leaf:
            """The decoded words as a leaf, hashed; ``lent``: words is a buffer of ``buffers`` to lend, ``spare``:
            one taken for this tensor and not used yet."""
            leaf = tree.Leaf(t["dtype"], tuple(t["shape"]), words)
            if object_id(leaf) != t["object"]:  # xxh3 runs at >10 GB/s: every load checks what it returns
                raise IntegrityError(
                    f"tensor decodes to bytes that do not match its content hash {t['object'][:20]}…",
                    ref=m.ref,
                    tensor=n,
                    hint="the store is damaged; run `ckpt verify` to see everything affected",
                )
            if (known is not None and t["object"] in known) or t["object"] in self._head:
                # never hand out the arrays we keep as delta bases: a copy, into the buffer taken for it if any
                if spare is not None and spare.dtype == words.dtype and spare.shape == words.shape:
                    np.copyto(spare, words)
                    words, lent, spare = spare, True, None
                else:
                    words = words.copy()
            elif keep is not None and unclaimed.pop(t["object"], False):  # (dict.pop: one copy where tensors share it)
                keep[t["object"]] = _private_copy(  # type: ignore[index]
                    words, m.objects[t["object"]], recycle, buffers, spares.pop(t["object"], None)
                )
            if spare is not None:
                buffers.give_back(spare)  # type: ignore[union-attr]
            if lent:
                words = buffers.lend(words)  # type: ignore[union-attr]
            return tree.Leaf(t["dtype"], tuple(t["shape"]), words)

        def one(n: str) -> tuple[str, tree.Leaf]:
            if n in m.tensors:
                return n, stored(n)
            rec = full[n]
            shards = {c["tensor"]: stored(c["tensor"]) for c in rec["chunks"]}
            return n, sharded.assemble_one(n, rec, shards)

        stored_names: list[str] = []
        for n in wanted:
            stored_names.extend([n] if n in m.tensors else [c["tensor"] for c in full[n]["chunks"]])
        taken, spares = _take_here(m, stored_names, buffers, keep, recycle)
        unclaimed = dict.fromkeys(keep or (), True)
        with (
            self.storage.prefetch(self._ranges_to_read(m, stored_names, known)),
            ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-decode", initializer=thread_initializer()) as ex,
        ):
            # small tensors go in batches (a few hundred futures cost the GIL more than decoding them), large
            # ones alone: each of those already runs on every coding thread. A batch of tiny tensors is nearly all
            # Python, so on a pool thread it only passes the GIL back and forth at every read and zstd call (a load
            # of 1,032 tensors of 64 bytes: 65-75 ms through the pool, 35 ms on the calling thread): the calling
            # thread decodes those, after handing the rest to the pool, and the results are taken in order.
            def decode(batch: list[str]) -> list[tuple[str, tree.Leaf]]:
                if not native.available or len(batch) < 2:
                    return [one(n) for n in batch]
                return self._decode_batch(m, batch, known, one, checked)

            batches = _batches(wanted, m.tensors)
            pooled = [ex.submit(decode, b) if nbytes >= _INLINE_BYTES else None for b, nbytes in batches]
            parts = [f if f is not None else _Ran(decode, b) for f, (b, _) in zip(pooled, batches, strict=True)]
            out: dict[str, tree.Leaf] = {}
            for part in parts:
                out.update(part.result())
        for unused in (*taken.values(), *spares.values()):  # (taken for a tensor the batch decoder wrote itself)
            buffers.give_back(unused)  # type: ignore[union-attr]
        return out

    def _decode_batch(
        self,
        m: Manifest,
        batch: list[str],
        known: Mapping[str, np.ndarray] | None,
        one: Callable[[str], tuple[str, tree.Leaf]],
        checked: Callable[[str, Mapping[str, Any], np.ndarray], tree.Leaf],
    ) -> list[tuple[str, tree.Leaf]]:
        """``[one(n) for n in batch]``, with the tensors whose chains are planes-zstd keyframes and float32 deltas
        decoded together by the C loop (codecs/native.py: their per-tensor Python cost more than their zstd work,
        serially on the GIL), one call per chain depth: every chain's root, then every first delta, and so on.
        The rest, and any tensor whose chain has a payload the C loop leaves, go through :meth:`_decode_chain`
        as before, which raises what is wrong with them."""
        chains: list[tuple[int, str, Mapping[str, Any], list[tuple[str, Mapping[str, Any]]], np.ndarray | None]] = []
        for i, n in enumerate(batch):
            t = m.tensors.get(n)
            walk = self._native_chain(m, t["object"], known) if t is not None else None
            if t is not None and walk is not None:  # (else a full tensor of shards, a decoded object, damage)
                chains.append((i, n, t, *walk))
        decoded: dict[str, np.ndarray] = {}
        failed: set[str] = set()
        depth = 0
        while True:
            items: list[native.Item] = []
            pending: dict[str, np.ndarray] = {}
            for _, _, _, links, root in chains:
                if depth >= len(links):
                    continue
                oid, rec = links[depth]
                prev = root if depth == 0 else decoded.get(links[depth - 1][0])
                if oid in decoded or oid in pending or oid in failed or (depth and prev is None):
                    continue
                planned = self._native_item(m, oid, rec, prev)
                if planned is None:
                    failed.add(oid)
                    continue
                items.append(planned[0])
                pending[oid] = planned[1]
            if not items and not any(depth < len(c[3]) for c in chains):
                break
            for (oid, words), ok in zip(pending.items(), native.decode_many(items), strict=True):
                if ok == 0:
                    decoded[oid] = words
                else:
                    failed.add(oid)
            depth += 1
        out: list[tuple[str, tree.Leaf] | None] = [None] * len(batch)
        handed: set[int] = set()
        for i, n, record, links, _ in chains:
            result = decoded.get(links[-1][0])
            if result is None:
                continue
            if id(result) in handed:  # one object, two tensors (tied weights): each gets its own array
                result = result.copy()
            handed.add(id(result))
            out[i] = (n, checked(n, record, result))
        return [r if r is not None else one(n) for r, n in zip(out, batch, strict=True)]

    def _native_chain(
        self, m: Manifest, oid: str, known: Mapping[str, np.ndarray] | None
    ) -> tuple[list[tuple[str, Mapping[str, Any]]], np.ndarray | None] | None:
        """An object's delta chain for the C loop: its links root first, and the decoded array the root is a
        delta against (None: the root is a keyframe). None when the object is already decoded or the chain is
        one the C loop does not take (other references, too long: _decode_chain says why)."""
        links: list[tuple[str, Mapping[str, Any]]] = []
        o = oid
        while True:
            hit = known.get(o) if known is not None else None
            if hit is None:
                hit = self._head.get(o)
            if hit is not None:
                return (links[::-1], hit) if links else None
            rec = m.objects.get(o)
            if rec is None or len(links) > MAX_CHAIN:
                return None
            links.append((o, rec))
            refs = rec.get("refs")
            if not refs:
                return links[::-1], None
            if not isinstance(refs, Mapping) or len(refs) != 1 or "prev" not in refs:
                return None
            o = refs["prev"]

    def _native_item(
        self, m: Manifest, oid: str, rec: Mapping[str, Any], prev: np.ndarray | None
    ) -> tuple[native.Item, np.ndarray] | None:
        """:func:`native.plan` for one stored object (None when it does not apply or its record is damaged)."""
        try:
            spec = codecs.TensorSpec(rec["dtype"], tuple(rec["shape"]))
            return native.plan(self._payload(m, oid, rec), rec.get("codecs") or (), spec, prev)
        except (CkptStoreError, KeyError, TypeError, ValueError, MemoryError):
            return None  # _decode_chain says what is wrong (MemoryError: a forged shape, as it says)

    def _payload(self, m: Manifest, oid: str, rec: Mapping[str, Any]) -> bytes | memoryview:
        """An object's stored bytes (a view of the pack where storage can map it)."""
        length = int(rec["length"])
        check_pack_key(rec.get("pack"), m.key)
        try:
            return self.storage.read_view(rec["pack"], int(rec["offset"]), length) if length else b""
        except (FileNotFoundError, EOFError, OSError) as exc:
            raise IntegrityError(
                f"cannot read object {oid[:20]}…: {exc}",
                path=rec.get("pack"),
                ref=m.ref,
                hint="run `ckpt verify`; the pack file is missing or cut",
            ) from None

    def _ranges_to_read(
        self, m: Manifest, names: Iterable[str], known: Mapping[str, np.ndarray] | None
    ) -> list[tuple[str, int, int]]:
        """The pack ranges that decoding ``names`` reads: their delta chains down to objects already decoded
        (a hint for remote storage, which then fetches them in a few large requests instead of one per object)."""
        out: list[tuple[str, int, int]] = []
        seen: set[str] = set()
        todo = [m.tensors[n]["object"] for n in names]
        while todo:
            o = todo.pop()
            rec = m.objects.get(o)
            if o in seen or rec is None or (known is not None and o in known) or o in self._head:
                continue
            seen.add(o)
            with contextlib.suppress(FormatError, KeyError, TypeError, ValueError):  # decoding reports damage
                check_pack_key(rec["pack"], m.key)
                if int(rec["length"]):
                    out.append((rec["pack"], int(rec["offset"]), int(rec["length"])))
            todo.extend(rec.get("refs", {}).values())
        return out

    def load(self, ref: str | Ref, *, tensors: str | None = None) -> Any:
        """Read a checkpoint back as the nested state it was saved from, bit-exactly.

        ``tensors`` chooses the framework of the returned tensors: ``"torch"``, ``"numpy"``, or by default the
        one the checkpoint was saved from. bfloat16/float8 come back to numpy as raw unsigned words.
        """
        m = self.resolve(ref)
        # a sharded (DCP) checkpoint's tree names full tensors, put back together from their shards (docs/dcp.md)
        return _unflatten(m, self.load_leaves(m, list(m.full_tensors) if "dcp" in m.data else None), tensors)

    def load_tensor(self, ref: str | Ref, name: str, *, tensors: str | None = None) -> Any:
        """Read one tensor without decoding the rest of the checkpoint."""
        m = self.resolve(ref)
        leaf = self.load_leaves(m, [name])[name]
        return _converter(tensors or m.data.get("framework", "numpy"))(leaf)

    def iter_load(self, run: str, *, tensors: str | None = None) -> Iterator[tuple[Manifest, Any]]:
        """Every checkpoint of a run in step order; each delta decodes against the one just read.

        Between two checkpoints it keeps decoded what the next few checkpoints' tensors are coded against
        (their ``prev`` objects) or share: the next one's, and those of the ones after it (a segment's deltas
        coded against its root, several checkpoints back: :func:`~ckptstore.codecs.planner.delta_base`) up to
        one checkpoint's bytes more. So memory stays near three checkpoints whatever the chain length, and each
        object is decoded once where the layout is the planner's. A delta whose base was not kept walks its
        chain as a single load does. The copies kept go into the memory of bases read for the last time where
        there are such, and the large tensors handed out come back for the next checkpoint once the caller lets
        go of them (:mod:`ckptstore.buffers`): fresh memory costs a zeroed page per fault, the largest single
        cost of this loop (docs/benchmarks.md)."""
        steps = self.steps(run)
        known: dict[str, np.ndarray] = {}
        buffers = BufferPool()
        # the next few manifests, each with the objects reading it needs from before it (a segment root is at
        # most keyframe_interval checkpoints back in the planner's layout)
        ahead: collections.deque[tuple[Manifest, set[str]]] = collections.deque()
        depth = min(16, self.keyframe_interval + 1)
        queued = 0
        while True:
            while len(ahead) < depth + 1 and queued < len(steps):
                f = self.manifest(run, steps[queued])
                ahead.append((f, _next_bases(f)))
                queued += 1
            if not ahead:
                return
            m, _ = ahead.popleft()
            wanted = _bases_to_keep(m, known, [b for _, b in ahead])
            keep: dict[str, Any] = {o: None for o in wanted if o not in known}
            # the bases this checkpoint reads once and the next ones do not need: their memory takes the copies
            # kept for the next one (fresh memory would cost a page fault per 4 KB, the largest cost here)
            leaves = self.load_leaves(
                m, known=known, keep=keep, recycle=_spent_bases(m, known, wanted), buffers=buffers
            )
            buffers.end_round()
            # private copies: the caller may change the tensors it gets, the next delta must not see that
            before, known = known, {o: w for o, w in known.items() if o in wanted}
            known.update({o: w for o, w in keep.items() if w is not None})
            still = {id(w) for w in known.values()}
            for w in before.values():  # bases not needed any more: their memory takes later copies and tensors
                if id(w) not in still:
                    buffers.give_back(w)
            del before
            if "dcp" in m.data:  # a sharded checkpoint's tree names full tensors: put them together
                leaves = {n: sharded.assemble_one(n, rec, leaves) for n, rec in m.full_tensors.items()}
            # nothing of this checkpoint stays referenced here once it is handed out: a caller that lets go of it
            # before asking for the next one frees its memory for the next one's tensors (held here while the
            # next one decoded, each checkpoint's large tensors went into fresh memory, page faults and all)
            handed = [leaves]
            del leaves
            yield m, _unflatten(m, handed.pop(), tensors)

    # ------------------------------------------------------------------ metadata edits
    def update_metadata(self, ref: str | Ref, update: Callable[[dict[str, Any]], None]) -> Manifest:
        """Edit a checkpoint's metadata (tags, notes) in place; tensors are not touched."""
        with self._run_lock(_run_of(ref)):
            m = self.resolve(ref)
            data = json.loads(json.dumps(m.data))
            update(data.setdefault("metadata", {}))  # "absent means {}" (docs/format.md)
            data["metadata"] = validate_metadata(data["metadata"])
            self.storage.write(m.key, manifest_bytes(data))
            new = Manifest(data, m.key)
            self._manifests[(new.run, new.step)] = new
            return new

    # ------------------------------------------------------------------ deleting
    def delete(
        self, refs: Iterable[str | Ref], *, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Delete checkpoints. Remaining checkpoints stay bit-exact: those whose delta chains ran through a
        deleted checkpoint's objects are re-encoded against their new predecessor before anything is freed."""
        refs = list(refs)
        with self._run_lock(*map(_run_of, refs)):
            doomed = {(m.run, m.step): m for m in (self.resolve(r) for r in refs)}
            runs = sorted({r for r, _ in doomed})
            before = self._stored_bytes(runs)
            rewritten = 0
            for run in runs:
                doomed_packs = {p for (r, _), m in doomed.items() if r == run for p in m.data.get("packs", [])}
                for (r, s), m in doomed.items():
                    if r == run:
                        self.storage.delete(m.key)
                        self._manifests.pop((r, s), None)
                rewritten += self._rebase(run, doomed_packs, progress)
            freed_packs = self._gc_locked(runs=runs)
            after = self._stored_bytes(runs)
        return {
            "deleted": sorted(f"{r}@{s}" for r, s in doomed),
            "rewritten": rewritten,
            "freed_bytes": before - after,
            "removed_packs": freed_packs,
        }

    def drop_parts(
        self,
        refs: Iterable[str | Ref],
        parts: Iterable[str] = ("optimizer",),
        *,
        reason: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Drop ``parts`` (format §4.5; ``"optimizer"``: the optimizer state) from checkpoints, keeping the rest of
        each bit-exact. Works like :meth:`delete`: the manifests are rewritten without those tensors first, then
        the checkpoints whose chains ran through objects only the dropped tensors owned are rebased, then gc
        frees the space. Checkpoints that do not hold a part are left as they are."""
        wanted = list(parts)
        refs = list(refs)
        runs = sorted(set(map(_run_of, refs)))
        with self._run_lock(*runs):
            before = self._stored_bytes(runs)
            targets = {(m.run, m.step): m for m in (self.resolve(r) for r in refs)}
            changed: list[str] = []
            dropped_tensors = 0
            doomed: dict[str, dict[tuple[str, int], int]] = {}  # run -> location -> first step dropping it
            for (run, step), m in sorted(targets.items()):
                if "dcp" in m.data:
                    raise InvalidStateError(f"{m.ref} is a sharded (DCP) checkpoint; dropping parts of it is "
                                            "not supported", ref=m.ref)  # fmt: skip
                keys = [k for p in wanted for k in _parts.part_keys(m.data["tree"], p)]
                if not keys:
                    continue
                skeleton, gone = _parts.strip_tree(m.data["tree"], keys)
                gone_set = set(gone)
                tensors = {n: t for n, t in m.tensors.items() if n not in gone_set}
                table: dict[str, dict[str, Any]] = {}
                for t in tensors.values():
                    for o in m.chain(t["object"]):
                        table[o] = m.objects[o]
                first_drop = doomed.setdefault(run, {})
                for o in set(m.objects) - set(table):
                    first_drop.setdefault((m.objects[o]["pack"], int(m.objects[o]["offset"])), step)
                data = dict(m.data)
                data.update(tree=skeleton, tensors=tensors, objects=table)
                data["packs"] = [p for p in data.get("packs", []) if any(r["pack"] == p for r in table.values())]
                stats = dict(data.get("stats", {}))
                stats["logical_bytes"] = int(stats.get("logical_bytes", 0)) - sum(
                    int(np.prod(m.tensors[n]["shape"], dtype=np.int64)) * dtypes.dtype(m.tensors[n]["dtype"]).itemsize
                    for n in gone
                )
                data["stats"] = stats
                rec = {"part": ",".join(sorted({p for p in wanted if _parts.part_keys(m.data["tree"], p)})),
                       "keys": keys, "tensors": len(gone), "time": _now()}  # fmt: skip
                if reason:
                    rec["reason"] = reason
                data["dropped"] = [*data.get("dropped", []), rec]
                self.storage.write(m.key, manifest_bytes(data))
                self._manifests[(run, step)] = Manifest(data, m.key)
                changed.append(m.ref)
                dropped_tensors += len(gone)
            rewritten, removed = self._free_locations(doomed, progress)
            after = self._stored_bytes(runs)
        return {
            "changed": changed,
            "dropped_tensors": dropped_tensors,
            "rewritten": rewritten,
            "freed_bytes": before - after,
            "removed_packs": removed,
        }

    def _free_locations(
        self, doomed: Mapping[str, dict[tuple[str, int], int]], progress: Callable[[int, int], None] | None
    ) -> tuple[int, int]:
        """After manifests stopped naming some objects (run → ``(pack, offset)`` → the first step that let go of
        it): rebase the checkpoints whose chains still reach them, then gc. Call under the write lock. An object
        a checkpoint at or before the first one that let go of it still holds stays where it is."""
        rewritten = 0
        for run, first_drop in sorted(doomed.items()):
            for s in self.steps(run):
                for orec in self.manifest(run, s).objects.values():
                    loc = (str(orec["pack"]), int(orec["offset"]))
                    if first_drop.get(loc, -1) >= s:
                        del first_drop[loc]
            rewritten += self._rebase(run, set(), progress, doomed_locs=set(first_drop))
        return rewritten, self._gc_locked(runs=sorted(doomed))

    def _rebase(
        self,
        run: str,
        doomed_packs: set[str],
        progress: Callable[[int, int], None] | None,
        *,
        doomed_locs: set[tuple[str, int]] | None = None,
    ) -> int:
        """Make every remaining checkpoint of ``run`` independent of ``doomed_packs`` (and of the objects at
        ``doomed_locs``, ``(pack, offset)`` pairs).

        Goes in step order. Records re-encoded for an earlier checkpoint replace the same object's records in
        later manifests (same content id, new location), so a deletion re-encodes each affected object once
        instead of cascading down the chain. Only tensors whose chain still reaches a doomed pack are re-encoded,
        against their new predecessor (or as keyframes).
        """
        locs = doomed_locs or set()
        if not doomed_packs and not locs:
            return 0
        rewritten = 0
        replaced: dict[str, dict[str, Any]] = {}
        settled: dict[str, dict[str, Any]] = {}  # records of the manifests already rebased in this pass
        prev: Manifest | None = None
        steps = self.steps(run)

        def table_for(m: Manifest) -> dict[str, dict[str, Any]]:
            # Every object m needs, preferring records re-encoded earlier in this pass, then m's own, then
            # those of the checkpoints already rebased, whose objects new deltas may point at.
            table: dict[str, dict[str, Any]] = {}
            todo_ids = [t["object"] for t in m.tensors.values()]
            while todo_ids:
                o = todo_ids.pop()
                if o in table:
                    continue
                rec = replaced.get(o) or m.objects.get(o) or settled.get(o)
                if rec is None:
                    raise FormatError(f"object {o} lost while rebasing", path=m.key)
                table[o] = rec
                todo_ids.extend(rec.get("refs", {}).values())
            return with_true_depths(table)

        for i, s in enumerate(steps):
            m = self.manifest(run, s)
            # A hot checkpoint (format §4.7) keeps its own one-object records; only those in doomed places are
            # written again, raw. It never takes records re-encoded for others, which may be deltas.
            hot = m.data.get("layout") == "hot"
            # An object the (rebased) predecessor already holds is reused as it is: re-encoding it "against
            # the predecessor" would make it a delta of itself.
            if prev is not None and not hot:
                for t in m.tensors.values():
                    o = t["object"]
                    if o in prev.objects and o not in replaced:
                        for d in prev.chain(o):
                            replaced.setdefault(d, prev.objects[d])
            view = m if hot else Manifest({**m.data, "objects": table_for(m)}, m.key)
            touched = [
                n
                for n, t in view.tensors.items()
                if int(view.objects[t["object"]].get("depth", 0)) >= self.keyframe_interval
                or any(
                    view.objects[o]["pack"] in doomed_packs
                    or (view.objects[o]["pack"], int(view.objects[o]["offset"])) in locs
                    for o in view.chain(t["object"])
                )
            ]
            pack_key = None
            stored = 0
            mine: dict[str, dict[str, Any]] = {}
            if touched:
                fresh = self.load_leaves(view, touched)
                todo, seen = [], set()
                for n in touched:
                    o = view.tensors[n]["object"]
                    if o not in seen:
                        seen.add(o)
                        todo.append((n, o))
                pack_key = new_pack_key(run, s)
                records, stored = self._encode_into_pack(pack_key, todo, fresh, prev, None, hot=hot)
                replaced.update(records)
                mine = records
            table = with_true_depths({o: mine.get(o, r) for o, r in m.objects.items()}) if hot else table_for(m)
            if table != m.objects:
                data = dict(m.data)
                data["objects"] = table
                if pack_key is not None:
                    data["packs"] = [*data.get("packs", []), pack_key]
                    stats = dict(data.get("stats", {}))
                    stats["stored_bytes"] = int(stats.get("stored_bytes", 0)) + stored
                    data["stats"] = stats
                self.storage.write(m.key, manifest_bytes(data))
                m = Manifest(data, m.key)
                self._manifests[(run, s)] = m
                rewritten += 1
            prev = m
            settled.update(m.objects)
            if progress is not None:
                progress(i + 1, len(steps))
        return rewritten

    # ------------------------------------------------------------------ compaction (layout "hot")
    def compact(
        self,
        run: str | None = None,
        *,
        newest: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Re-encode the objects of hot checkpoints (format §4.7) densely, as a dense save would have: each
        changed tensor as a delta against its predecessor (or a keyframe), then gc.

        Goes in step order and leaves the newest checkpoint hot unless ``newest`` (a finished run: the smallest
        store, but ``@latest`` then decodes a chain). Each checkpoint is decoded and re-encoded into a new pack
        *outside* the write lock (a save meanwhile does not wait for it), then committed under it: its manifest
        is replaced atomically if it and its predecessor are still as they were, else the pack is dropped and the
        checkpoint tried again. A crash leaves it either hot or compacted, and a reader holding the old manifest
        retries with the new one if gc freed the old pack under it."""
        if run is not None:
            check_run_name(run)
        runs = [run] if run is not None else self.runs()
        t0 = time.perf_counter()
        done: list[str] = []
        logical = 0
        encode_s = 0.0
        before = self._stored_bytes(runs)  # only these runs' packs: other runs' writers go on meanwhile
        for r in runs:
            misses = 0
            while misses < 3:
                with self._run_lock(r):
                    todo = self._hot_steps(r, newest)
                    if not todo:
                        break
                    m, p = self._fresh_pair(r, todo[0])
                t1 = time.perf_counter()
                try:
                    data, pack_key, words, nbytes = self._compact_encode(m, p)
                except (CheckpointNotFoundError, IntegrityError):  # deleted or rebased meanwhile: look again
                    misses += 1
                    continue
                encode_s += time.perf_counter() - t1
                with self._run_lock(r):
                    committed = self._compact_commit(m, p, data, pack_key)
                if not committed:  # the checkpoint or its predecessor changed meanwhile: try again
                    misses += 1
                    continue
                self._compact_head = (r, m.step, words)
                logical += nbytes
                done.append(m.ref)
                if progress is not None:
                    progress(len(done), len(done) + len(todo) - 1)
        # Only the compacted runs' packs: writers of other runs go on meanwhile (format §12.3).
        with self._run_lock(*runs):
            removed = self._gc_locked(runs=runs)
        return {
            "compacted": done,
            "logical_bytes": logical,
            "seconds": time.perf_counter() - t0,
            "bytes_per_second": logical / encode_s if done and encode_s > 0 else None,
            "removed_packs": removed,
            "freed_bytes": before - self._stored_bytes(runs),
        }

    def _hot_steps(self, run: str, newest: bool) -> list[int]:
        """The steps of ``run`` whose manifests are hot, read afresh (another process may have written)."""
        steps = self.steps(run)
        out = []
        for s in steps if newest else steps[:-1]:
            self._manifests.pop((run, s), None)
            if self.manifest(run, s).data.get("layout") == "hot":
                out.append(s)
        return out

    def _fresh_pair(self, run: str, step: int) -> tuple[Manifest, Manifest | None]:
        """``run@step`` and its predecessor, read from storage (not the cache)."""
        earlier = [s for s in self.steps(run) if s < step]
        for s in [step, *earlier[-1:]]:
            self._manifests.pop((run, s), None)
        return self.manifest(run, step), (self.manifest(run, earlier[-1]) if earlier else None)

    def _compact_encode(
        self, m: Manifest, p: Manifest | None
    ) -> tuple[dict[str, Any], str | None, dict[str, np.ndarray], int]:
        """Encode ``m`` against ``p`` into a new pack (an orphan until committed); returns the new manifest, the
        pack (None if nothing was written), the words of ``m`` (the next compaction's bases) and the logical
        bytes re-encoded."""
        names, seen = [], set()
        for n, t in m.tensors.items():
            o = t["object"]
            if (p is None or o not in p.objects) and o not in seen:
                seen.add(o)
                names.append(n)
        leaves = self.load_leaves(m, names) if names else {}
        cached = self._compact_head
        head = dict(cached[2]) if cached is not None and p is not None and cached[:2] == (m.run, p.step) else {}
        pack_key = new_pack_key(m.run, m.step)
        _, table, wrote, stored, _ = self._write_objects(pack_key, leaves, p, None, head=head, keep_heads=False)
        for t in m.tensors.values():
            o = t["object"]
            if o not in table:
                assert p is not None  # every object not re-encoded is the predecessor's
                for d in p.chain(o):
                    table[d] = p.objects[d]
        data = {k: v for k, v in m.data.items() if k != "layout"}
        data["objects"] = table
        live = {rec["pack"] for rec in table.values()}
        data["packs"] = [k for k in m.data.get("packs", []) if k in live] + ([pack_key] if wrote else [])
        data["stats"] = {**m.data.get("stats", {}), "stored_bytes": stored}
        # The words just read are this checkpoint's values: the bases of the next compaction, without a decode.
        words = {o: head[o] for o in (t["object"] for t in m.tensors.values()) if o in head}
        words.update({m.tensors[n]["object"]: lf.words for n, lf in leaves.items()})
        return data, (pack_key if wrote else None), words, sum(lf.nbytes for lf in leaves.values())

    def _compact_commit(self, m: Manifest, p: Manifest | None, data: dict[str, Any], pack_key: str | None) -> bool:
        """Replace ``m``'s manifest by ``data`` if ``m`` and its predecessor are unchanged and the new pack is still
        there (a gc meanwhile removes orphans); call under the run's lock. On a miss the new pack is deleted."""
        try:
            m2, p2 = self._fresh_pair(m.run, m.step)
        except CkptStoreError:
            m2, p2 = None, None
        same = (
            m2 is not None
            and m2.data == m.data
            and (p2.data if p2 is not None else None) == (p.data if p is not None else None)
            and (pack_key is None or self.storage.exists(pack_key))
        )
        if not same:
            if pack_key is not None:
                self.storage.delete(pack_key)
            return False
        self.storage.write(m.key, manifest_bytes(data))
        self._manifests[(m.run, m.step)] = Manifest(data, m.key)
        return True

    def _schedule_compaction(self, run: str) -> None:
        if run in self._compact_pending:
            return
        if self._compactor is None:
            self._compactor = ThreadPoolExecutor(1, thread_name_prefix="ckpt-compact", initializer=run_in_background)
        self._compact_pending.add(run)
        self._compactor.submit(self._compact_background, run)

    def _compact_background(self, run: str) -> None:
        self._compact_pending.discard(run)  # a save from now on schedules another pass
        try:
            self.compact(run)
        except StoreLockedError:
            pass  # another process holds the store; the next save tries again
        except Exception as exc:  # a background failure must not kill training: kept, logged, raised by wait
            self.compaction_error = exc
            log.warning("background compaction of run %s failed: %s", run, exc)

    def wait_compaction(self) -> None:
        """Wait for background compaction to finish; raise its failure, if one happened."""
        if self._compactor is not None:
            self._compactor.shutdown(wait=True)
            self._compactor = None
        err, self.compaction_error = self.compaction_error, None
        if err is not None:
            raise err

    def gc(self) -> dict[str, Any]:
        """Remove pack files no committed manifest references (left by deletes or by interrupted saves)."""
        with self._write_lock():
            before = self._stored_bytes()
            removed = self._gc_locked()
            return {"removed_packs": removed, "freed_bytes": before - self._stored_bytes()}

    def _live_packs(self) -> set[str]:
        live: set[str] = set()
        for run in self.runs():
            for s in self.steps(run):
                for rec in self.manifest(run, s).objects.values():
                    live.add(rec["pack"])
        return live

    def _gc_locked(self, *, repack_below: float = 0.9, runs: Iterable[str] | None = None) -> int:
        """Delete unreferenced packs; copy the live objects out of mostly-dead packs (no re-encoding).

        Under the store-wide lock (``runs`` None) the whole store. Under the run locks of ``runs`` (a delete or
        a thin) only those runs' packs (``packs/RUN/``, where their saves write) and temp files: other runs'
        writers may have packs not yet named by a manifest, which are not ours to judge. Every manifest still
        counts as a reference, and a pack another run's manifest names is never moved."""
        self._manifests.clear()
        mine = None if runs is None else sorted(set(runs))
        manifests: list[Manifest] = []
        for r in self.runs():
            for s in self.steps(r):
                try:
                    manifests.append(self.manifest(r, s))
                except CheckpointNotFoundError:  # deleted meanwhile by another run's writer: no references
                    if mine is None or r in mine:
                        raise
        live: dict[str, dict[tuple[int, int], list[str]]] = {}  # pack -> (offset, length) -> object ids
        foreign: set[str] = set()  # packs named by manifests of runs we do not hold
        for m in manifests:
            for o, rec in m.objects.items():
                check_pack_key(rec.get("pack"), m.key)
                live.setdefault(rec["pack"], {}).setdefault((int(rec["offset"]), int(rec["length"])), []).append(o)
                if mine is not None and m.run not in mine:
                    foreign.add(rec["pack"])
        prefixes = [PACKS_DIR] if mine is None else [f"{PACKS_DIR}/{r}/" for r in mine]
        removed = 0
        if mine is None:  # store-wide: the multipart uploads of saves that died (S3; docs/remote.md)
            self.storage.abort_abandoned_uploads(PACKS_DIR)
        for prefix in prefixes:
            for key in self.storage.list(prefix):
                if key not in live:
                    self.storage.delete(key)
                    removed += 1
        for prefix in [RUNS_DIR] if mine is None else [f"{RUNS_DIR}/{r}/" for r in mine]:
            for key in self.storage.list(prefix):
                if ".tmp-" in key.rsplit("/", 1)[-1]:
                    self.storage.delete(key)
        for pack, spans in live.items():
            if pack in foreign or not any(pack.startswith(p) for p in prefixes):
                continue
            size = self.storage.size(pack)
            used = PACK_HEADER_SIZE + sum(length for _, length in spans)
            if used >= size * repack_below:
                continue
            new_key = repacked_key(pack)
            moved = copy_spans(self.storage, pack, spans, new_key)
            for m in manifests:
                if not any(rec["pack"] == pack for rec in m.objects.values()):
                    continue
                data = dict(m.data)
                table = {}
                for o, rec in m.objects.items():
                    if rec["pack"] == pack:
                        rec = {
                            **rec,
                            "pack": new_key,
                            "offset": moved[(int(rec["offset"]), int(rec["length"]))],
                        }
                    table[o] = rec
                data["objects"] = table
                data["packs"] = [new_key if p == pack else p for p in data.get("packs", [])]
                self.storage.write(m.key, manifest_bytes(data))
                m.data = data
            self.storage.delete(pack)
        self._manifests.clear()
        return removed

    def _stored_bytes(self, runs: Iterable[str] | None = None) -> int:
        prefixes = [PACKS_DIR] if runs is None else [f"{PACKS_DIR}/{r}/" for r in sorted(set(runs))]
        return sum(self.storage.size(k) for p in prefixes for k in self.storage.list(p))

    # ------------------------------------------------------------------ checking
    def verify(self, run: str | None = None, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Decode every object of every checkpoint and check it against its content hash; check every manifest's
        checksum and every pack's header. Goes on past damage: ``problems`` has one line per damaged tensor (or
        manifest, or pack header) and ``affected`` maps each damaged checkpoint to its damaged tensors (``[]``
        when its manifest itself cannot be read)."""
        self._manifests.clear()
        checked: set[str] = set()
        problems: list[str] = []
        affected: dict[str, list[str]] = {}
        ckpts = [(r, s) for r in ([run] if run else self.runs()) for s in self.steps(r)]
        packs: dict[str, list[str]] = {}  # pack -> the checkpoints reading it
        known: dict[str, np.ndarray] = {}  # the previous checkpoint's objects: bases of the next one's deltas
        for i, (r, s) in enumerate(ckpts):
            current: dict[str, np.ndarray] = {}
            try:
                m = self.manifest(r, s)
                problems.extend(f"{r}@{s}: {p}" for p in _parts.lossy_problems(m.data))
                tree.unflatten(m.data["tree"], lambda n: None)  # the skeleton reads back too
            except CkptStoreError as exc:
                problems.append(f"{r}@{s}: {exc}")
                affected[f"{r}@{s}"] = []
                known = {}
                if progress is not None:
                    progress(i + 1, len(ckpts))
                continue
            for name, t in m.tensors.items():
                try:
                    for o in reversed(m.chain(t["object"])):  # bases first
                        if o not in checked:
                            current[o] = self._decode_chain(m, o, known=ChainMap(current, known), verify=True)[0]
                            checked.add(o)
                        elif o in known:
                            current[o] = known[o]
                except CkptStoreError as exc:
                    problems.append(f"{r}@{s}: tensor {name!r}: {exc}")
                    affected.setdefault(f"{r}@{s}", []).append(name)
            for rec in m.objects.values():
                packs.setdefault(str(rec.get("pack")), []).append(f"{r}@{s}")
            known = current
            if progress is not None:
                progress(i + 1, len(ckpts))
        for pack, refs in sorted(packs.items()):
            why = self._pack_header_problem(pack)
            if why is not None:
                users = sorted(set(refs))
                problems.append(f"{pack}: {why} (read by {', '.join(users)})")
                for ref in users:
                    affected.setdefault(ref, [])
        return {
            "checkpoints": len(ckpts),
            "objects": len(checked),
            "problems": problems,
            "affected": {ref: sorted(names) for ref, names in affected.items()},
            "ok": not problems,
        }

    def _pack_header_problem(self, pack: str) -> str | None:
        """Why ``pack``'s 16-byte header is not a valid one (format §4), or ``None``."""
        try:
            head = bytes(self.storage.read_range(pack, 0, PACK_HEADER_SIZE))
        except (OSError, EOFError, ValueError) as exc:
            return f"cannot read the pack header: {exc}"
        if len(head) != PACK_HEADER_SIZE or head[:8] != pack_header()[:8] or head[12:] != b"\0" * 4:
            return "pack header is damaged"
        if not 1 <= int.from_bytes(head[8:12], "little") <= FORMAT_VERSION:
            return "pack header names an unknown format version (damaged)"
        return None

    def stats(self, run: str | None = None) -> dict[str, Any]:
        infos = self.checkpoints(run)
        logical = sum(i.logical_bytes for i in infos)
        stored = sum(i.stored_bytes for i in infos)
        packs = sum(self.storage.size(k) for k in self.storage.list(PACKS_DIR if run is None else f"{PACKS_DIR}/{run}"))
        return {
            "checkpoints": len(infos),
            "logical_bytes": logical,
            "stored_bytes": stored,
            "pack_bytes": packs,
            "ratio": logical / packs if packs else None,
        }


R = TypeVar("R")
_Encoded = tuple[str, dict[str, Any], list[bytes | memoryview]]  # an encode job's (object id, record, payload)

_BATCH_BYTES = 4 << 20  # tensors decoded in one task: up to this many bytes, or _BATCH_COUNT tensors
_BATCH_COUNT = 32
_INLINE_BYTES = 16 << 10  # tensors (a save) or batches (a load) this small are coded on the calling thread


class _Ran(Generic[R]):
    """``fn(arg)`` run on this thread, kept like a pool's finished future: ``result()`` returns it or raises its
    exception, in the pack's order. (A ``Future`` builds a ``threading.Condition``: ~3 µs a tensor for nothing.)"""

    __slots__ = ("_error", "_value")

    def __init__(self, fn: Callable[[Any], R], arg: Any) -> None:
        self._value: R | None = None
        self._error: Exception | None = None
        try:
            self._value = fn(arg)
        except Exception as exc:
            self._error = exc

    def result(self) -> R:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _batches(names: list[str], tensors: Mapping[str, Any]) -> list[tuple[list[str], int]]:
    """``names`` in order, cut into decode tasks: runs of small tensors, each large one alone; with their bytes."""
    out: list[tuple[list[str], int]] = []
    run: list[str] = []
    size = 0
    for n in names:
        t = tensors.get(n)
        nbytes = codecs.TensorSpec(t["dtype"], tuple(t["shape"])).nbytes if t is not None else _BATCH_BYTES
        if run and (size + nbytes > _BATCH_BYTES or len(run) >= _BATCH_COUNT):
            out.append((run, size))
            run, size = [], 0
        run.append(n)
        size += nbytes
    if run:
        out.append((run, size))
    return out


def _next_bases(m: Manifest | None) -> set[str]:
    """The objects reading ``m`` in order needs from the checkpoint before it: each tensor's object (unchanged
    tensors) and the ``prev`` base of each delta."""
    if m is None:
        return set()
    out = set()
    for t in m.tensors.values():
        o = t["object"]
        out.add(o)
        base = m.objects.get(o, {}).get("refs", {}).get("prev")
        if base is not None:
            out.add(base)
    return out


def _bases_to_keep(m: Manifest, known: Mapping[str, np.ndarray], later: list[set[str]]) -> set[str]:
    """What reading checkpoint ``m`` in order should keep decoded for the ones after it (``later``: the objects
    each of them needs, :func:`_next_bases`): all the next one needs, and of what the ones after it need, what
    is known or decoded now, soonest first, up to ``m``'s own bytes (memory stays bounded whatever the layout)."""
    if not later:
        return set()
    out = set(later[0])
    budget = sum(codecs.TensorSpec(t["dtype"], tuple(t["shape"])).nbytes for t in m.tensors.values())
    for bases in later[1:]:
        for o in bases - out:
            decoded = known.get(o)
            if decoded is None and o not in m.objects:
                continue
            nbytes = decoded.nbytes if decoded is not None else _object_bytes(m.objects[o])
            if nbytes > budget:
                return out
            budget -= nbytes
            out.add(o)
    return out


def _object_bytes(rec: Mapping[str, Any]) -> int:
    try:
        return codecs.TensorSpec(rec["dtype"], tuple(rec["shape"])).nbytes
    except (KeyError, TypeError, ValueError, CkptStoreError):
        return 1 << 62  # a damaged record: not worth keeping (decoding it says what is wrong)


def _spent_bases(m: Manifest, known: Mapping[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
    """The arrays of ``known`` that decoding all of ``m`` reads exactly once, as a delta's reference, and that
    neither ``m`` hands out (an unchanged tensor) nor the next checkpoint needs (``wanted``): once that delta is
    decoded nothing reads them again, so their memory may take a copy of its result."""
    reads: dict[str, int] = {}
    for t in m.tensors.values():
        todo = [t["object"]]
        while todo:  # each tensor's chain, as _decode_chain walks it: down to the first object already known
            o = todo.pop()
            if o in known:
                reads[o] = reads.get(o, 0) + 2  # handed out (copied) or read: not reusable either way
                continue
            for dep in m.objects.get(o, {}).get("refs", {}).values():
                if dep in known:
                    reads[dep] = reads.get(dep, 0) + 1
                else:
                    todo.append(dep)
    return {o: known[o] for o, n in reads.items() if n == 1 and o not in wanted}


def _private_copy(
    words: np.ndarray,
    rec: Mapping[str, Any],
    recycle: dict[str, np.ndarray] | None,
    buffers: BufferPool | None = None,
    spare: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``words`` that nobody else holds: in the spent base it was decoded from, if there is one, else
    in ``spare`` (a flat buffer of ``buffers`` taken for it), a buffer of ``buffers`` or fresh memory."""
    out = None
    for dep in rec.get("refs", {}).values() if recycle else ():
        buf = recycle.pop(dep, None)  # type: ignore[union-attr]  # (pop: each base takes one copy, once)
        if buf is not None and buf is not words and buf.dtype == words.dtype and buf.shape == words.shape:
            out = buf
            break
    if out is None and spare is not None and spare.dtype == words.dtype and spare.shape == words.shape:
        out, spare = spare, None
    if out is None and buffers is not None and words.ndim == 1:
        out = buffers.take(words.dtype, words.size)
    if spare is not None and buffers is not None:  # (not used)
        buffers.give_back(spare)
    if out is None:
        out = fresh_words(words.dtype, words.size).reshape(words.shape)
    np.copyto(out, words)
    return out


def _take_here(
    m: Manifest,
    names: list[str],
    buffers: BufferPool | None,
    keep: Mapping[str, Any] | None,
    recycle: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The buffers a load of ``names`` decodes its large tensors into (tensor name -> buffer), and those its
    private copies of objects in ``keep`` go into where no spent base of ``recycle`` takes them (object id ->
    buffer), taken on the calling thread.

    Why here and not on the decode threads: glibc gives each thread an arena of its own, and a decode thread's
    arena never reuses the memory the caller's thread freed (checkpoints it let go of, anything else it read), so
    every buffer a decode thread took was fresh memory, a zeroed page per 4 KB fault. torch.load allocates on the
    caller's thread. Measured on the benchmark run, passes keeping every checkpoint in one process, alternating
    with torch.load's: 1.19 s and 8-54 thousand page faults a pass, against 1.83 s and 150-310 thousand with the
    buffers taken on the decode threads (docs/benchmarks.md)."""
    taken = {n: b for n in names if (b := _lendable(buffers, m.tensors[n])) is not None}
    spares: dict[str, np.ndarray] = {}
    if not taken or not keep:
        return taken, spares
    for n in names:
        o = m.tensors[n]["object"]
        spent = set(m.objects[o].get("refs", {}).values()) & set(recycle or ())
        if o in keep and o not in spares and not spent and (b := _lendable(buffers, m.tensors[n])) is not None:
            spares[o] = b
    return taken, spares


def _lendable(buffers: BufferPool | None, t: Mapping[str, Any]) -> np.ndarray | None:
    """A buffer of ``buffers`` for tensor record ``t``'s words (None: no pool, too small, or not plain words)."""
    if buffers is None or t["dtype"] == "complex128":
        return None
    spec = codecs.TensorSpec(t["dtype"], tuple(t["shape"]))
    if spec.dt.itemsize not in (1, 2, 4, 8):
        return None
    return buffers.take(np.dtype(f"<u{spec.dt.itemsize}"), spec.size)


def _unflatten(m: Manifest, leaves: dict[str, tree.Leaf], tensors: str | None) -> Any:
    """The nested state of checkpoint ``m`` from its decoded tensors, as the framework ``tensors`` names."""
    convert = _converter(tensors or m.data.get("framework", "numpy"))
    return tree.unflatten(m.data["tree"], lambda n: convert(leaves[n]))


def _run_of(ref: str | Ref) -> str:
    """The run a reference names (before resolving it: the run's lock is taken first)."""
    return (parse_ref(ref) if isinstance(ref, str) else ref).run


def _converter(kind: str) -> Callable[[tree.Leaf], Any]:
    if kind == "torch":
        from ckptstore.torch import leaf_to_tensor

        return leaf_to_tensor
    if kind == "numpy":
        return lambda leaf: leaf.to_numpy()
    raise ValueError(f"unknown tensor framework {kind!r}; use 'torch' or 'numpy'")


def create_store(
    location: str | os.PathLike[str],
    *,
    exist_ok: bool = False,
    keyframe_interval: int | None = None,
    level: int | None = None,
    codec: str | None = None,
    layout: str | None = None,
    **options: Any,
) -> Store:
    """Create a new, empty store at a path or URL. ``keyframe_interval`` and ``level`` (zstd) are recorded in the
    store as its settings, used by every later writer that does not override them; so is ``codec``, the name of
    the registered bytes codec that ends every chain (default ``planes-zstd``), and ``layout`` (``"dense"``, the
    default, or ``"hot"``: format §4.7)."""
    storage_options = options.pop("storage_options", {}) or {}
    storage = open_storage(location, **storage_options)
    if storage.exists(STORE_FILE):
        if exist_ok:
            return Store(storage, keyframe_interval=keyframe_interval, level=level, layout=layout, **options)
        raise StoreExistsError("a store already exists here", path=storage.url)
    if storage.list("") and not exist_ok:
        raise StoreExistsError("the directory is not empty", path=storage.url, hint="choose an empty or new directory")
    if layout is not None and layout not in LAYOUTS:
        raise InvalidStateError(f"unknown layout {layout!r}", hint=f"use one of {', '.join(LAYOUTS)}")
    if keyframe_interval is not None:
        keyframe_interval = max(1, int(keyframe_interval))  # as Store(keyframe_interval=...) always took it
    settings = store_settings(
        {
            "settings": {
                k: v
                for k, v in (
                    ("keyframe_interval", keyframe_interval),
                    ("zstd_level", level),
                    ("codec", codec),
                    ("layout", layout),
                )
                if v is not None
            }
        }
    )
    codecs.bytes_codec(settings["codec"], settings["zstd_level"])  # an unknown codec fails before the store exists
    info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": _now(), "settings": settings}
    storage.write(STORE_FILE, json_bytes(info))
    return Store(storage, **options)


def open_store(location: str | os.PathLike[str], *, create: bool = False, **options: Any) -> Store:
    """Open an existing store (or create it when ``create`` is true)."""
    storage_options = options.pop("storage_options", {}) or {}
    storage = open_storage(location, **storage_options)
    if create and not storage.exists(STORE_FILE):
        return create_store(location, storage_options=storage_options, **options)
    return Store(storage, **options)
