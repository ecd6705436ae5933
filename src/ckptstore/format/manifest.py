"""Manifests (docs/format.md §5-§7): the JSON document that commits one checkpoint, object ids, keys and limits.

A manifest lists, for one ``run@step``, the state tree, every tensor (dtype, shape, object id) and every object the
checkpoint needs with its location (``pack``, ``offset``, ``length``), its codec chain and its delta references. It is
written last, in one ``Storage.create`` (a new checkpoint) or ``Storage.write`` (a rebase or repack moving objects):
a checkpoint exists exactly when its manifest does.

Objects may live in any number of packs: the manifest's ``packs`` list and each object's ``pack`` say where. So a
writer that is not a :class:`~ckptstore.store.Store` (one torch.distributed rank writing its own pack with
:class:`ckptstore.format.pack.PackWriter`, a coordinator then committing one manifest that lists the objects of every
rank's pack) builds the same ``data`` dict, checks it with :class:`Manifest`, and commits
:func:`manifest_bytes` at :func:`manifest_key`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ckptstore.errors import (
    DamagedManifestError,
    FormatError,
    InvalidStateError,
    TensorNotFoundError,
    UnsupportedVersionError,
)
from ckptstore.format import parts, sharded, tree
from ckptstore.format.spec import FORMAT_VERSION, MANIFEST_KIND, MAX_NDIM, RUNS_DIR

MAX_CHAIN = 256  # readers refuse longer delta chains (they can only come from damage)

__all__ = [
    "MAX_CHAIN",
    "CheckpointInfo",
    "Manifest",
    "check_structure",
    "json_bytes",
    "manifest_bytes",
    "manifest_key",
    "object_id",
    "parse_manifest",
    "run_lock_key",
    "with_true_depths",
]


def object_id(leaf: tree.Leaf) -> str:
    """Content address of a tensor: xxh3-128 over its dtype, shape and little-endian bytes."""
    h = xxhash.xxh3_128()
    h.update(f"{leaf.dtype}:{','.join(map(str, leaf.shape))}:".encode())
    h.update(memoryview(np.ascontiguousarray(leaf.data)).cast("B"))  # type: ignore[arg-type]
    return "xxh128:" + h.hexdigest()


def manifest_key(run: str, step: int) -> str:
    """The key a checkpoint's manifest is committed at."""
    return f"{RUNS_DIR}/{run}/ckpt/{step:020d}.json"


CHECKSUM_PREFIX = b'{"checksum":"xxh128:'
_CHECKSUM_HEX = 32


def run_lock_key(run: str) -> str:
    """The lock object of one run's writers (format §2, §12.3)."""
    return f"{RUNS_DIR}/{run}/.lock"


def manifest_bytes(data: dict[str, Any]) -> bytes:
    """A manifest's bytes as committed (the one place manifests are serialised): compact JSON, no NaN, opening
    with ``"checksum"``, the xxh3-128 of the same document without it (format §4.1), so any damage to a manifest
    is detected on read instead of silently changing a shape, a name, a location or a metadata value."""
    body = json.dumps({k: v for k, v in data.items() if k != "checksum"}, separators=(",", ":"), allow_nan=False)
    raw = body.encode()
    return CHECKSUM_PREFIX + xxhash.xxh3_128(raw).hexdigest().encode() + b'",' + raw[1:]


def _damaged(key: str, why: str) -> DamagedManifestError:
    return DamagedManifestError(
        f"manifest is damaged: {why}",
        path=key,
        hint="this checkpoint cannot be read; run `ckpt verify` to see everything affected, restore the file "
        "from a backup or delete the checkpoint",
    )


def _near_checksum(k: str) -> bool:
    """``k`` is ``"checksum"`` or one bit away from it (a damaged first key of a checksummed manifest)."""
    b = k.encode()
    return len(b) == 8 and sum(bin(x ^ y).count("1") for x, y in zip(b, b"checksum", strict=True)) <= 1


def parse_manifest(raw: bytes, key: str) -> dict[str, Any]:
    """The document of a committed manifest, its checksum checked (and removed). Manifests written before the
    checksum (format §4.1) have none and are read as they are; one whose checksum is damaged is never taken for
    one of those. Damage is a :class:`~ckptstore.errors.DamagedManifestError`."""
    if raw.startswith(CHECKSUM_PREFIX):
        n = len(CHECKSUM_PREFIX)
        want, rest = raw[n : n + _CHECKSUM_HEX], raw[n + _CHECKSUM_HEX :]
        if not rest.startswith(b'",'):
            raise _damaged(key, "its checksum field is cut or malformed")
        body = b"{" + rest[2:]
        if xxhash.xxh3_128(body).hexdigest().encode() != want:
            raise _damaged(key, "its content does not match its checksum")
    else:
        body = raw
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise _damaged(key, "not valid JSON") from None
    if not isinstance(data, dict):
        raise _damaged(key, "not a JSON object")
    if body is raw and any(_near_checksum(k) for k in list(data)[:1]):
        raise _damaged(key, "its checksum field is damaged")
    return data


def json_bytes(obj: Any) -> bytes:
    """User data (metadata) as compact JSON; a non-finite number or a non-JSON value is an InvalidStateError."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise InvalidStateError(
            f"metadata holds a non-finite number: {exc}", hint="use None for missing values"
        ) from None
    except TypeError as exc:
        raise InvalidStateError(f"metadata is not JSON-serialisable: {exc}") from None


@dataclass
class CheckpointInfo:
    """One row of a listing: what ``ckpt ls`` shows."""

    run: str
    step: int
    created: str
    logical_bytes: int
    stored_bytes: int
    tensors: int
    metadata: dict[str, Any]
    #: parts dropped from this checkpoint (format §4.5), e.g. ``["optimizer"]`` for a weights-only checkpoint
    dropped: list[str] = dataclasses.field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.run}@{self.step}"

    @property
    def ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "run": self.run,
            "step": self.step,
            "created": self.created,
            "epoch": self.metadata.get("epoch"),
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "ratio": round(self.ratio, 4) if math.isfinite(self.ratio) else None,
            "tensors": self.tensors,
            "dropped": self.dropped,
            "metadata": self.metadata,
        }


_MAX_INT = 2**62  # offsets, lengths and element counts beyond this can only be forged (and overflow C longs)


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= _MAX_INT


def _shape_ok(v: Any) -> bool:
    return (isinstance(v, list) and len(v) <= MAX_NDIM and all(_is_int(d) for d in v)
            and math.prod(v) <= _MAX_INT)  # fmt: skip


def check_structure(data: dict[str, Any], key: str) -> None:
    """Every field a reader acts on has its documented type (format §4.2, §8, §14): so a forged or damaged manifest
    (one whose checksum was recomputed) is a :class:`FormatError` naming the field, never a ``KeyError`` or a
    ``TypeError`` from deep inside a load."""

    def bad(where: str, what: str) -> FormatError:
        return FormatError(f"manifest is malformed: {where} {what}", path=key,
                           hint="the file is damaged or was not written by ckptstore; restore it or delete the "
                           "checkpoint")  # fmt: skip

    if not isinstance(data["run"], str) or not _is_int(data["step"]):
        raise bad("run/step", "must be a string and a non-negative integer")
    if data.get("framework", "numpy") not in ("torch", "numpy"):
        raise bad("framework", "must be 'torch' or 'numpy'")
    objects, tensors = data["objects"], data["tensors"]
    if not isinstance(objects, dict) or not isinstance(tensors, dict):
        raise bad("tensors/objects", "must be objects")
    for oid, rec in objects.items():
        where = f"object {oid[:20]}"
        if not isinstance(rec, dict):
            raise bad(where, "is not an object")
        if not isinstance(rec.get("dtype"), str) or not _shape_ok(rec.get("shape")):
            raise bad(where, "needs a dtype string and a shape of non-negative integers")
        if not isinstance(rec.get("pack"), str) or not _is_int(rec.get("offset")) or not _is_int(rec.get("length")):
            raise bad(where, "needs a pack key and a non-negative offset and length")
        codecs = rec.get("codecs")
        if not isinstance(codecs, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("config", {}), dict)
            for c in codecs
        ):
            raise bad(where, "has a malformed codec chain")  # fmt: skip
        refs = rec.get("refs", {})
        if not isinstance(refs, dict) or not all(isinstance(r, str) and r in objects for r in refs.values()):
            raise bad(where, "has references that are not objects of this manifest")
        if "depth" in rec and not _is_int(rec["depth"]):
            raise bad(where, "has a malformed depth")
    for name, t in tensors.items():
        if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or not _shape_ok(t.get("shape")):
            raise bad(f"tensor {name!r}", "needs a dtype string and a shape of non-negative integers")
        if not isinstance(t.get("object"), str) or t["object"] not in objects:
            raise bad(f"tensor {name!r}", "names an object this manifest does not list")
    packs = data.get("packs", [])
    if not isinstance(packs, list) or not all(isinstance(p, str) for p in packs):
        raise bad("packs", "must be a list of pack keys")
    stats = data.get("stats", {})
    if not isinstance(stats, dict) or not all(_is_int(v) for v in stats.values()):
        raise bad("stats", "must map names to non-negative integers")
    for field, kind in (("metadata", dict), ("dropped", list), ("created", str)):
        if field in data and not isinstance(data[field], kind):
            raise bad(field, f"must be a {kind.__name__}")


def share_equal_lists(data: dict[str, Any]) -> None:
    """Make equal ``shape`` and ``codecs`` values of a parsed manifest's records one object each, in place.

    JSON parsing gives every record its own lists, though a checkpoint has a few dozen distinct shapes and codec
    chains: a real 344-tensor, 510-object manifest had 3,616 objects the garbage collector tracks, 1,289 after
    this, and every full collection visits each of them for as long as the manifest is kept (measured:
    docs/benchmarks.md). Safe because records are never changed in place (a store already shares whole records
    between manifests); call it on a validated manifest only (:func:`check_structure`: the keys are short)."""
    shared: dict[str, Any] = {}
    for table in (data["objects"], data["tensors"]):
        for rec in table.values():
            for field in ("shape", "codecs"):
                v = rec.get(field)
                if v is not None:  # repr, not ==, as the key: it tells 1 from 1.0 and from True
                    rec[field] = shared.setdefault(repr(v), v)


class Manifest:
    """A committed checkpoint's manifest (parsed and validated)."""

    def __init__(self, data: dict[str, Any], key: str) -> None:
        self.data = data
        self.key = key
        if data.get("kind") != MANIFEST_KIND:
            raise FormatError("not a ckptstore manifest", path=key)
        if not _is_int(data.get("format_version", 0)):
            raise FormatError("manifest is malformed: format_version must be an integer", path=key)
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"manifest format version {data['format_version']} is newer than {FORMAT_VERSION}",
                path=key,
                hint="upgrade ckptstore",
            )
        for field in ("run", "step", "tree", "tensors", "objects"):
            if field not in data:
                raise FormatError(f"manifest lacks {field!r}", path=key)
        check_structure(data, key)
        self._full: dict[str, dict[str, Any]] | None = None

    @property
    def run(self) -> str:
        return str(self.data["run"])

    @property
    def step(self) -> int:
        return int(self.data["step"])

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        tensors: dict[str, dict[str, Any]] = self.data["tensors"]
        return tensors

    @property
    def full_tensors(self) -> dict[str, dict[str, Any]]:
        """The checkpoint's tensors by the names its state tree uses: :attr:`tensors`, except for a sharded (DCP)
        checkpoint, whose tree names full tensors that are put together from shard tensors (each record then has
        ``chunks``; :func:`ckptstore.format.sharded.full_tensors`). ``Store.load_leaves`` reads both kinds."""
        if "dcp" not in self.data:
            return self.tensors
        if self._full is None:
            try:
                self._full = sharded.full_tensors(self.data["dcp"], self.tensors)
            except FormatError as exc:
                raise FormatError(exc.message, path=self.key, hint=exc.hint) from None
        return self._full

    @property
    def objects(self) -> dict[str, dict[str, Any]]:
        objects: dict[str, dict[str, Any]] = self.data["objects"]
        return objects

    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.data.setdefault("metadata", {})
        return meta

    @property
    def ref(self) -> str:
        return f"{self.run}@{self.step}"

    def chain(self, oid: str) -> list[str]:
        """The object and every object it depends on, dependencies last."""
        out, todo = [], [oid]
        while todo:
            o = todo.pop()
            if o in out:
                continue
            out.append(o)
            rec = self.objects.get(o)
            if rec is None:
                raise FormatError(f"manifest references unknown object {o}", path=self.key)
            todo.extend(rec.get("refs", {}).values())
        return out

    def subset(self, names: Iterable[str], *, reuse: dict[tuple[str, str], Any] | None = None) -> Manifest:
        """A manifest of this checkpoint that lists only the tensors ``names`` (names of :attr:`full_tensors`; a
        sharded checkpoint's full tensors bring their shards and their part of the ``dcp`` section), the objects
        on their delta chains and the metadata, nothing else (an empty tree): what ``Store.load_leaves`` reads to
        decode those tensors, exactly as from the whole manifest. For keeping an index of a few tensors of many
        checkpoints (``StoreTrajectory``) at a fraction of a parsed manifest's memory.

        ``reuse`` (``("object", id)`` / ``("tensor", name)`` -> record) shares records between the subsets of the
        checkpoints of one run: a record equal to one in it is taken from it, a new one is added. Consecutive
        checkpoints have most of their delta chains in common, so this keeps one record per object, not one per
        checkpoint that reaches it. A subset's ``tensors`` are not the checkpoint's, so the retry of
        ``load_leaves`` after a compaction (which re-reads the manifest and compares them) does not apply to it:
        its holder reads the whole manifest again instead."""
        wanted = list(dict.fromkeys(names))
        full = self.full_tensors
        missing = [n for n in wanted if n not in self.tensors and n not in full]
        if missing:
            raise TensorNotFoundError(f"no tensor {missing[0]!r}", ref=self.ref, tensor=missing[0])
        stored: list[str] = []
        for n in wanted:
            stored.extend([n] if n in self.tensors else [c["tensor"] for c in full[n]["chunks"]])
        shared: dict[tuple[str, str], Any] = {} if reuse is None else reuse

        def name(v: str) -> str:
            out: str = shared.setdefault(("str", v), v)
            return out

        def take(kind: str, key: str, rec: dict[str, Any]) -> dict[str, Any]:
            have = shared.get((kind, key))
            if have is not None and (have is rec or have == rec):
                return have
            if reuse is not None:  # a copy (the record may belong to a manifest the Store keeps) sharing equal
                rec = dict(rec)  # names, shapes and codec chains with the records taken before it
                for k, v in rec.items():
                    if isinstance(v, str):
                        rec[k] = name(v)
                    elif isinstance(v, list):  # repr, not ==, as the key: it tells 1 from 1.0 and True
                        rec[k] = shared.setdefault(("list", repr(v)), v)
            shared[(kind, key)] = rec
            return rec

        tensors = {name(n): take("tensor", n, self.tensors[n]) for n in dict.fromkeys(stored)}
        objects: dict[str, dict[str, Any]] = {}
        for t in tensors.values():
            for o in self.chain(t["object"]):
                if o not in objects:
                    objects[name(o)] = take("object", o, self.objects[o])
        data: dict[str, Any] = {
            k: self.data[k] for k in ("kind", "format_version", "run", "step", "framework") if k in self.data
        }
        data.update(tree={}, tensors=tensors, objects=objects, metadata=self.metadata)
        if "dcp" in self.data:
            chosen = set(wanted) - set(self.tensors)
            layout = self.data["dcp"]
            data["dcp"] = {
                **{k: v for k, v in layout.items() if k != "items"},
                "items": {fqn: it for fqn, it in sharded.items(layout).items() if it.get("name") in chosen},
            }
        return Manifest(data, self.key)

    def info(self) -> CheckpointInfo:
        st = self.data.get("stats", {})
        return CheckpointInfo(
            self.run,
            self.step,
            self.data.get("created", ""),
            int(st.get("logical_bytes", 0)),
            int(st.get("stored_bytes", 0)),
            len(self.tensors),
            self.metadata,
            [*parts.dropped_parts(self.data), *(["lossless"] if "lossy" in self.data else [])],
        )


# What a Store keeps parsed, in records (objects + tensors): a parsed manifest holds ~0.8 KB of Python objects per
# record once its equal lists are shared (measured: 710 KB and 1,289 tracked objects for a 344-tensor, 510-object
# checkpoint, 220 KB of JSON; 1.12 MB without sharing), so this is ~75 such manifests, ~55 MB.
MANIFEST_CACHE_RECORDS = 65_536


class ManifestCache:
    """The manifests a Store has parsed, the most recently used kept up to ``max_records`` records in all.

    Unbounded, reading a run of thousands of checkpoints in order (or listing it) kept every manifest: a GB of
    Python objects per thousand, and the garbage collector's full passes, which visit every one, grew with it. The
    metadata of every manifest seen stays (a few KB each), so a metadata selector (``run@best:val_loss``) looks
    at every checkpoint without parsing evicted manifests again. A cache only: whatever it drops is read back from
    storage, which always holds what it held. Thread-safe (async saves and compaction run on their own threads).
    """

    def __init__(self, max_records: int = MANIFEST_CACHE_RECORDS) -> None:
        self.max_records = max(1, int(max_records))
        self._full: OrderedDict[tuple[str, int], Manifest] = OrderedDict()
        self._metadata: dict[tuple[str, int], dict[str, Any]] = {}
        self._records = 0
        self._lock = threading.Lock()

    @staticmethod
    def _weight(m: Manifest) -> int:
        return len(m.objects) + len(m.tensors) + 1

    def get(self, key: tuple[str, int]) -> Manifest | None:
        with self._lock:
            m = self._full.get(key)
            if m is not None:
                self._full.move_to_end(key)
            return m

    def __setitem__(self, key: tuple[str, int], m: Manifest) -> None:
        with self._lock:
            old = self._full.pop(key, None)
            if old is not None:
                self._records -= self._weight(old)
            self._full[key] = m
            self._records += self._weight(m)
            self._metadata[key] = m.metadata
            while self._records > self.max_records and len(self._full) > 1:
                _, gone = self._full.popitem(last=False)
                self._records -= self._weight(gone)

    def pop(self, key: tuple[str, int], default: Manifest | None = None) -> Manifest | None:
        with self._lock:
            self._metadata.pop(key, None)
            m = self._full.pop(key, None)
            if m is not None:
                self._records -= self._weight(m)
            return default if m is None else m

    def __contains__(self, key: object) -> bool:
        """Whether this cache has seen ``key`` committed (parsed or saved), kept whole or not."""
        with self._lock:
            return key in self._metadata

    def __len__(self) -> int:
        with self._lock:
            return len(self._full)

    @property
    def records(self) -> int:
        with self._lock:
            return self._records

    def metadata(self, key: tuple[str, int]) -> dict[str, Any] | None:
        """The metadata of a manifest this cache has seen (kept whole or not), else ``None``."""
        with self._lock:
            return self._metadata.get(key)

    def clear(self) -> None:
        with self._lock:
            self._full.clear()
            self._metadata.clear()
            self._records = 0


def with_true_depths(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records whose ``depth`` matches their actual chain in ``table`` (copies only those that change): after a
    rebase re-encodes a base onto a deeper one, the depths recorded in its dependents are stale."""
    depths: dict[str, int] = {}

    def depth(o: str, seen: tuple[str, ...] = ()) -> int:
        if o in depths:
            return depths[o]
        if o in seen or len(seen) > MAX_CHAIN:
            raise FormatError(f"delta chain of object {o[:20]}… loops or exceeds {MAX_CHAIN} objects")
        ref = table[o].get("refs", {}).get("prev")
        depths[o] = 0 if ref is None or ref not in table else depth(ref, (*seen, o)) + 1
        return depths[o]

    out = {}
    for o, rec in table.items():
        d = depth(o)
        out[o] = rec if int(rec.get("depth", 0)) == d else {**rec, "depth": d}
    return out
