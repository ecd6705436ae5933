"""The Store: save, load, list, delete, thin, gc and verify checkpoints of training runs.

Writes are planned first (hash every tensor; reuse identical objects; pick a delta base), then executed: objects
stream into one pack file per save, and the manifest — which lists every object the checkpoint needs with its
location — is committed last and atomically. A checkpoint exists only once its manifest exists, so a crash at any
point leaves the committed checkpoints as they were. See docs/format.md for the bytes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ckptstore import codecs
from ckptstore.asyncsave import DEFAULT_MAX_IN_FLIGHT, AsyncSaver, PreparedSave, SaveHandle
from ckptstore.codecs.planner import delta_base
from ckptstore.errors import (
    CheckpointExistsError,
    CkptStoreError,
    ConcurrentCommitError,
    FormatError,
    IntegrityError,
    InvalidStateError,
    StoreExistsError,
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
    json_bytes,
    manifest_bytes,
    manifest_key,
    object_id,
    with_true_depths,
)
from ckptstore.format.names import check_run_name, check_step, check_tensor_name
from ckptstore.format.pack import PackWriter, check_pack_key, copy_spans, new_pack_key, repacked_key
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


def store_settings(info: Mapping[str, Any]) -> dict[str, Any]:
    """The write settings a store records in ckptstore.json (format §3); a store written before they were
    recorded has none, and reads with the defaults it was written with."""
    given = info.get("settings") or {}
    out: dict[str, Any] = {
        "keyframe_interval": int(given.get("keyframe_interval", DEFAULT_KEYFRAME_INTERVAL)),
        "zstd_level": int(given.get("zstd_level", DEFAULT_LEVEL)),
        "codec": str(given.get("codec", codecs.DEFAULT_BYTES_CODEC)),
    }
    if out["keyframe_interval"] < 1 or not 1 <= out["zstd_level"] <= 22:
        raise FormatError(f"{STORE_FILE} holds invalid settings {given!r}")
    return out


_WINDOW = 4  # tensors being encoded ahead of the writer, per worker


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """A store of training runs. Open one with :func:`open_store` or create it with :func:`create_store`.

    ``threads`` sets encode/decode parallelism. ``keyframe_interval`` bounds delta chains: a tensor is stored whole
    at least every that many checkpoints, so reading any checkpoint decodes at most that many objects per tensor.
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
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.storage = storage
        self.threads = threads or min(2, os.cpu_count() or 1)
        self.info = self._read_store_file()
        # The store's recorded settings, unless this process overrides them (then only for its own writes).
        self.settings = store_settings(self.info)
        kf = self.settings["keyframe_interval"] if keyframe_interval is None else keyframe_interval
        self.keyframe_interval = max(1, int(kf))
        self.level = self.settings["zstd_level"] if level is None else int(level)
        self.codec: str = self.settings["codec"]  # the bytes codec ending every chain this Store writes
        # Private copies of the words of the last checkpoint this Store saved: the delta bases of the next save,
        # so a training loop never reads its own checkpoints back. About one checkpoint of memory.
        self._head: dict[str, np.ndarray] = {}
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._saver = AsyncSaver(self._commit_prepared, max_in_flight=max_in_flight)

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
        except ValueError:
            raise FormatError(f"{STORE_FILE} is not JSON", path=self.storage.url) from None
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            raise FormatError(f"{STORE_FILE} does not describe a ckptstore store", path=self.storage.url)
        if int(info.get("version", 0)) > FORMAT_VERSION:
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
        """Wait for the saves in flight (raising the first background failure not yet reported), then close."""
        try:
            self.wait()
        finally:
            self._saver.shutdown()
            self._head = {}
            self.storage.close()

    def wait(self) -> None:
        """Wait for the :meth:`save_async` saves in flight; raise the first background failure not yet reported."""
        self._saver.wait_idle()
        self._saver.raise_failure()

    def _settle(self) -> None:
        # The thread that called save_async reads its own writes: it waits for the saves in flight.
        if self._saver.in_flight:
            self._saver.settle()

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        self._settle()
        with self.storage.lock(LOCK_FILE):
            yield

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
            from ckptstore.errors import CheckpointNotFoundError

            raise CheckpointNotFoundError(f"no checkpoint {run}@{step}", ref=f"{run}@{step}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FormatError("manifest larger than the format's limit", path=key)
        try:
            data = json.loads(raw)
        except ValueError:
            raise FormatError("manifest is not valid JSON", path=key) from None
        if not isinstance(data, dict):
            raise FormatError("manifest is not a JSON object", path=key)
        m = Manifest(data, key)
        self._manifests[(run, step)] = m
        return m

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
            entries = [{"step": s, "metadata": self.manifest(r.run, s).metadata} for s in steps]
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
        with self._write_lock():
            steps = self.steps(p.run)
            if p.step in steps:
                raise CheckpointExistsError(
                    f"checkpoint {p.run}@{p.step} already exists",
                    ref=f"{p.run}@{p.step}",
                    hint="delete it first (`ckpt rm`) or save under another step",
                )
            earlier = [s for s in steps if s < p.step]
            base = self.manifest(p.run, earlier[-1]) if earlier else None
            manifest = self._write_checkpoint(
                p.run, p.step, p.skeleton, p.leaves, base, p.metadata, p.framework, progress
            )
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
        tensors, objects, wrote, stored, new_head = self._write_objects(pack_key, leaves, base, progress)
        data = {
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
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], bool, int, dict[str, np.ndarray]]:
        """Hash ``leaves``, dedup them against ``base`` and encode the new objects into ``pack_key``: the one
        write path of :meth:`save` and :meth:`write_shards`. Returns the manifest's ``tensors`` and ``objects``,
        whether the pack was written, its stored bytes, and the delta heads for the next save (the caller sets
        them once its checkpoint is safe)."""
        names = list(leaves)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-hash") as ex:
            oids = list(ex.map(lambda n: object_id(leaves[n]), names))
        tensors = {
            n: {"dtype": leaves[n].dtype, "shape": list(leaves[n].shape), "object": o}
            for n, o in zip(names, oids, strict=True)
        }
        objects: dict[str, dict[str, Any]] = {}
        todo: list[tuple[str, str]] = []  # (tensor name, object id) to encode, first occurrence of each id
        planned: set[str] = set()
        for n, o in zip(names, oids, strict=True):
            if base is not None and o in base.objects:
                for dep in base.chain(o):
                    objects[dep] = base.objects[dep]
            elif o not in planned:
                planned.add(o)
                todo.append((n, o))
        # unchanged tensors carry their words over; head entries are keyed by content, so they stay right
        new_head = {o: self._head[o] for o in oids if o in self._head}
        stored = 0
        if todo:
            records, stored = self._encode_into_pack(pack_key, todo, leaves, base, progress, new_head)
            for o, rec in records.items():
                objects[o] = rec
                for dep in rec.get("refs", {}).values():
                    if base is not None:
                        for d in base.chain(dep):
                            objects.setdefault(d, base.objects[d])
        return tensors, objects, bool(todo), stored, new_head

    def _encode_into_pack(
        self,
        pack_key: str,
        todo: list[tuple[str, str]],
        leaves: Mapping[str, tree.Leaf],
        base: Manifest | None,
        progress: Callable[[int, int], None] | None,
        new_head: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Encode the new objects in parallel and stream them, in order, into one pack file."""
        records: dict[str, dict[str, Any]] = {}
        total = len(todo)
        history = [st for st in self.steps(base.run) if st <= base.step] if base is not None else []
        # Base objects that other objects' chains pass through: another job may be reading those while decoding,
        # so their head arrays are never overwritten in place.
        referenced = {d for r in base.objects.values() for d in r.get("refs", {}).values()} if base else set()

        def job(item: tuple[str, str]) -> tuple[str, dict[str, Any], list[bytes | memoryview]]:
            name, oid = item
            leaf = leaves[name]
            spec = codecs.TensorSpec(leaf.dtype, leaf.shape)
            words = leaf.words
            refs: dict[str, np.ndarray] = {}
            base_oid = None
            depth = 0
            spare = None  # a head array this job owns once encoded: its memory takes the copy of ``words``
            if base is not None:
                chosen = self._delta_base(name, leaf, base, history)
                if chosen is not None:
                    base_oid, depth = chosen
                    # consumed once: dropping it keeps old head + new head near one checkpoint
                    prev_words = self._head.pop(base_oid, None)
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
            with ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-encode") as ex:
                window: list[Future[tuple[str, dict[str, Any], list[bytes | memoryview]]]] = []
                it = iter(todo)
                done = 0
                for item in it:
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
        fut: Future[tuple[str, dict[str, Any], list[bytes | memoryview]]],
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
        try:
            if self.storage.exists(key):
                raise CheckpointExistsError(
                    f"checkpoint {run}@{step} already exists (another job writing run {run!r}?)",
                    ref=f"{run}@{step}",
                    hint="give each job its own run name or step; this save's packs were freed",
                )
            self.storage.create(key, manifest_bytes(data))
        except (ConcurrentCommitError, CheckpointExistsError):
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
        _depth: int = 0,
    ) -> tuple[np.ndarray, bool]:
        """Decode one object, resolving its delta chain; returns the words and whether the array is private to
        this call (decoded here, not a cached base). ``known`` holds already-decoded objects (the previous
        checkpoint when reading a run in order). With ``verify`` the object itself is decoded and hashed even if
        known; its references may still come from ``known``. A delta whose base is private is decoded into the
        base's memory: a chain of any length then allocates one output instead of one per link."""
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
        length = int(rec["length"])
        check_pack_key(rec.get("pack"), manifest.key)
        try:
            payload = self.storage.read_view(rec["pack"], int(rec["offset"]), length) if length else b""
        except (FileNotFoundError, EOFError, OSError) as exc:
            raise IntegrityError(
                f"cannot read object {oid[:20]}…: {exc}",
                path=rec.get("pack"),
                ref=manifest.ref,
                hint="run `ckpt verify`; the pack file is missing or cut",
            ) from None
        try:
            words = codecs.decode(payload, rec["codecs"], spec, refs, reusable=private)
        except CkptStoreError as exc:
            raise IntegrityError(
                f"object {oid[:20]}… does not decode: {exc}", path=rec.get("pack"), ref=manifest.ref
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
    ) -> dict[str, tree.Leaf]:
        m = ref if isinstance(ref, Manifest) else self.resolve(ref)
        wanted = list(m.tensors) if names is None else list(names)
        for n in wanted:
            if n not in m.tensors:
                raise TensorNotFoundError(
                    f"no tensor {n!r}", ref=m.ref, tensor=n, hint=f"`ckpt show {m.ref}` lists the tensors"
                )

        def one(n: str) -> tuple[str, tree.Leaf]:
            t = m.tensors[n]
            words, _ = self._decode_chain(m, t["object"], known=known)
            leaf = tree.Leaf(t["dtype"], tuple(t["shape"]), words)
            if object_id(leaf) != t["object"]:  # xxh3 runs at >10 GB/s: every load checks what it returns
                raise IntegrityError(
                    f"tensor decodes to bytes that do not match its content hash {t['object'][:20]}…",
                    ref=m.ref,
                    tensor=n,
                    hint="the store is damaged; run `ckpt verify` to see everything affected",
                )
            if (known is not None and t["object"] in known) or t["object"] in self._head:
                words = words.copy()  # never hand out the arrays we keep as delta bases
            return n, tree.Leaf(t["dtype"], tuple(t["shape"]), words)

        with (
            self.storage.prefetch(self._ranges_to_read(m, wanted, known)),
            ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-decode") as ex,
        ):
            return dict(ex.map(one, wanted))

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
        leaves = self.load_leaves(m)
        if "dcp" in m.data:  # a sharded checkpoint: put the full tensors back together (docs/dcp.md)
            leaves = sharded.assemble(m.data["dcp"], leaves)
        kind = tensors or m.data.get("framework", "numpy")
        convert = _converter(kind)
        return tree.unflatten(m.data["tree"], lambda n: convert(leaves[n]))

    def load_tensor(self, ref: str | Ref, name: str, *, tensors: str | None = None) -> Any:
        """Read one tensor without decoding the rest of the checkpoint."""
        m = self.resolve(ref)
        full = sharded.full_names(m.data["dcp"]) if "dcp" in m.data else {}
        if name in full:
            leaf = sharded.assemble(m.data["dcp"], self.load_leaves(m, full[name]), [name])[name]
        else:
            leaf = self.load_leaves(m, [name])[name]
        return _converter(tensors or m.data.get("framework", "numpy"))(leaf)

    def iter_load(self, run: str, *, tensors: str | None = None) -> Iterator[tuple[Manifest, Any]]:
        """Every checkpoint of a run in step order; each delta decodes against the one just read."""
        known: dict[str, np.ndarray] = {}
        for s in self.steps(run):
            m = self.manifest(run, s)
            leaves = self.load_leaves(m, known=known)
            # private copies: the caller may change the tensors it gets, the next delta must not see that
            known = {m.tensors[n]["object"]: lf.data.copy() for n, lf in leaves.items()}
            convert = _converter(tensors or m.data.get("framework", "numpy"))
            yield m, tree.unflatten(m.data["tree"], lambda n, lv=leaves, c=convert: c(lv[n]))  # type: ignore[misc]

    # ------------------------------------------------------------------ metadata edits
    def update_metadata(self, ref: str | Ref, update: Callable[[dict[str, Any]], None]) -> Manifest:
        """Edit a checkpoint's metadata (tags, notes) in place; tensors are not touched."""
        with self._write_lock():
            m = self.resolve(ref)
            data = json.loads(json.dumps(m.data))
            update(data.setdefault("metadata", {}))  # "absent means {}" (docs/format.md)
            data["metadata"] = validate_metadata(data["metadata"])
            raw = json_bytes(data)
            self.storage.write(m.key, raw)
            new = Manifest(data, m.key)
            self._manifests[(new.run, new.step)] = new
            return new

    # ------------------------------------------------------------------ deleting
    def delete(
        self, refs: Iterable[str | Ref], *, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Delete checkpoints. Remaining checkpoints stay bit-exact: those whose delta chains ran through a
        deleted checkpoint's objects are re-encoded against their new predecessor before anything is freed."""
        with self._write_lock():
            doomed = {(m.run, m.step): m for m in (self.resolve(r) for r in refs)}
            runs = sorted({r for r, _ in doomed})
            before = self._stored_bytes()
            rewritten = 0
            for run in runs:
                doomed_packs = {p for (r, _), m in doomed.items() if r == run for p in m.data.get("packs", [])}
                for (r, s), m in doomed.items():
                    if r == run:
                        self.storage.delete(m.key)
                        self._manifests.pop((r, s), None)
                rewritten += self._rebase(run, doomed_packs, progress)
            freed_packs = self._gc_locked()
            after = self._stored_bytes()
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
        with self._write_lock():
            before = self._stored_bytes()
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
            after = self._stored_bytes()
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
        return rewritten, self._gc_locked()

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
            # An object the (rebased) predecessor already holds is reused as it is: re-encoding it "against
            # the predecessor" would make it a delta of itself.
            if prev is not None:
                for t in m.tensors.values():
                    o = t["object"]
                    if o in prev.objects and o not in replaced:
                        for d in prev.chain(o):
                            replaced.setdefault(d, prev.objects[d])
            view = Manifest({**m.data, "objects": table_for(m)}, m.key)
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
            if touched:
                fresh = self.load_leaves(view, touched)
                todo, seen = [], set()
                for n in touched:
                    o = view.tensors[n]["object"]
                    if o not in seen:
                        seen.add(o)
                        todo.append((n, o))
                pack_key = new_pack_key(run, s)
                records, stored = self._encode_into_pack(pack_key, todo, fresh, prev, None)
                replaced.update(records)
            table = table_for(m)
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

    def _gc_locked(self, *, repack_below: float = 0.9) -> int:
        """Delete unreferenced packs; copy the live objects out of mostly-dead packs (no re-encoding)."""
        self._manifests.clear()
        manifests = [self.manifest(r, s) for r in self.runs() for s in self.steps(r)]
        live: dict[str, dict[tuple[int, int], list[str]]] = {}  # pack -> (offset, length) -> object ids
        for m in manifests:
            for o, rec in m.objects.items():
                check_pack_key(rec.get("pack"), m.key)
                live.setdefault(rec["pack"], {}).setdefault((int(rec["offset"]), int(rec["length"])), []).append(o)
        removed = 0
        for key in self.storage.list(PACKS_DIR):
            if key not in live:
                self.storage.delete(key)
                removed += 1
        for key in self.storage.list(RUNS_DIR):
            if ".tmp-" in key.rsplit("/", 1)[-1]:
                self.storage.delete(key)
        for pack, spans in live.items():
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

    def _stored_bytes(self) -> int:
        return sum(self.storage.size(k) for k in self.storage.list(PACKS_DIR))

    # ------------------------------------------------------------------ checking
    def verify(self, run: str | None = None, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Decode every object of every checkpoint and check it against its content hash."""
        self._manifests.clear()
        checked: set[str] = set()
        problems: list[str] = []
        ckpts = [(r, s) for r in ([run] if run else self.runs()) for s in self.steps(r)]
        known: dict[str, np.ndarray] = {}  # the previous checkpoint's objects: bases of the next one's deltas
        for i, (r, s) in enumerate(ckpts):
            current: dict[str, np.ndarray] = {}
            try:
                m = self.manifest(r, s)
                problems.extend(f"{r}@{s}: {p}" for p in _parts.lossy_problems(m.data))
                for t in m.tensors.values():
                    for o in reversed(m.chain(t["object"])):  # bases first
                        if o not in checked:
                            current[o] = self._decode_chain(m, o, known=ChainMap(current, known), verify=True)[0]
                            checked.add(o)
                        elif o in known:
                            current[o] = known[o]
            except CkptStoreError as exc:
                problems.append(f"{r}@{s}: {exc}")
            known = current
            if progress is not None:
                progress(i + 1, len(ckpts))
        return {"checkpoints": len(ckpts), "objects": len(checked), "problems": problems, "ok": not problems}

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
    **options: Any,
) -> Store:
    """Create a new, empty store at a path or URL. ``keyframe_interval`` and ``level`` (zstd) are recorded in the
    store as its settings, used by every later writer that does not override them; so is ``codec``, the name of
    the registered bytes codec that ends every chain (default ``planes-zstd``)."""
    storage_options = options.pop("storage_options", {}) or {}
    storage = open_storage(location, **storage_options)
    if storage.exists(STORE_FILE):
        if exist_ok:
            return Store(storage, keyframe_interval=keyframe_interval, level=level, **options)
        raise StoreExistsError("a store already exists here", path=storage.url)
    if storage.list("") and not exist_ok:
        raise StoreExistsError("the directory is not empty", path=storage.url, hint="choose an empty or new directory")
    if keyframe_interval is not None:
        keyframe_interval = max(1, int(keyframe_interval))  # as Store(keyframe_interval=...) always took it
    settings = store_settings(
        {
            "settings": {
                k: v
                for k, v in (("keyframe_interval", keyframe_interval), ("zstd_level", level), ("codec", codec))
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
