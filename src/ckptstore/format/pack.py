"""Pack files (docs/format.md §8-§9): where object bytes live, how packs are named, written, read and compacted.

A pack is a 16-byte header (``CKPTPACK``, the format version as a little-endian u32, 4 reserved zero bytes)
followed by encoded objects back to back. Nothing in a pack says where an object starts: the manifest that lists
the object holds its ``offset`` and ``length``. A pack is written once under a fresh key (random suffix, so a key is
never reused and readers may cache pack bytes forever) and is only ever deleted whole by gc.

:class:`PackWriter` is the one writer: any writer of packs uses it, not only :class:`~ckptstore.store.Store`.
One torch.distributed rank may write its own pack (``new_pack_key(run, step, tag=f"rank{r}")``) and hand the
``(offset, length)`` of each object to a coordinator that commits one manifest over several packs
(:mod:`ckptstore.format.manifest`). Readers check every location with :func:`check_pack_key` before reading.
"""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING, Any

from ckptstore.errors import FormatError
from ckptstore.format.spec import FORMAT_VERSION, PACK_HEADER_SIZE, PACK_MAGIC, PACKS_DIR

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ckptstore.storage import Storage

__all__ = ["PackWriter", "check_pack_key", "copy_spans", "new_pack_key", "pack_header", "repacked_key"]

_ID_CHARS = 12  # hex digits of the random suffix


def pack_header(version: int = FORMAT_VERSION) -> bytes:
    """The 16 bytes every pack starts with."""
    header = PACK_MAGIC + struct.pack("<II", version, 0)
    assert len(header) == PACK_HEADER_SIZE
    return header


def new_pack_key(run: str, step: int, *, tag: str = "") -> str:
    """A fresh pack key for objects first written by ``run@step``: ``packs/RUN/STEP-ID.pack`` (``STEP`` as 20
    digits, ``ID`` random hex). ``tag`` (letters, digits and ``-``, e.g. a DCP rank and job: ``r2-JOB``) names the
    writer: ``packs/RUN/STEP-TAG-ID.pack``, so every writer of one checkpoint has packs of its own."""
    if tag and not tag.replace("-", "").isalnum():
        raise ValueError(f"pack tag {tag!r} must be letters, digits and '-'")
    prefix = f"{tag}-" if tag else ""
    return f"{PACKS_DIR}/{run}/{step:020d}-{prefix}{uuid.uuid4().hex[:_ID_CHARS]}.pack"


def repacked_key(key: str) -> str:
    """The key of a compacted copy of pack ``key``: the same run and step, a new random id."""
    return key.rsplit("-", 1)[0] + f"-{uuid.uuid4().hex[:_ID_CHARS]}.pack"


_GOOD_KEYS: set[str] = set()  # keys already checked (a load checks every object's; most share a few packs)


def check_pack_key(key: Any, where: str) -> None:
    """Object locations must stay inside the store's packs/ folder, whatever a (damaged) manifest says."""
    if isinstance(key, str) and key in _GOOD_KEYS:
        return
    if (
        not isinstance(key, str)
        or not key.startswith(f"{PACKS_DIR}/")
        or not key.endswith(".pack")
        or any(part in ("", ".", "..") or "\\" in part for part in key.split("/"))
    ):
        raise FormatError(f"object location {str(key)[:80]!r} is outside the store's packs", path=where)
    if len(_GOOD_KEYS) > 100_000:  # bounded: a long-lived process reading many stores
        _GOOD_KEYS.clear()
    _GOOD_KEYS.add(key)


class PackWriter:
    """Writes one pack: the header on open, then objects appended in order; ``commit`` makes it visible.

    >>> with PackWriter(storage, new_pack_key("run", 3)) as w:  # doctest: +SKIP
    ...     offset, length = w.append([b"encoded", b"parts"])
    ...     w.commit()
    """

    def __init__(self, storage: Storage, key: str) -> None:
        self.key = key
        self._writer = storage.open_writer(key)
        try:
            self._writer.write(pack_header())
        except BaseException:
            self._writer.abort()
            raise
        self._done = False

    @property
    def tell(self) -> int:
        """Bytes written so far, header included (the pack's size once committed)."""
        return int(self._writer.tell)

    def append(self, parts: Iterable[bytes | memoryview]) -> tuple[int, int]:
        """Write one object (its encoded parts, back to back); returns its ``(offset, length)`` in the pack."""
        offset = self.tell
        for part in parts:
            self._writer.write(part)
        return offset, self.tell - offset

    def commit(self) -> None:
        self._writer.commit()
        self._done = True

    def abort(self) -> None:
        if not self._done:
            self._writer.abort()
            self._done = True

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a no-op after commit


def copy_spans(
    storage: Storage, pack: str, spans: Iterable[tuple[int, int]], new_key: str
) -> dict[tuple[int, int], int]:
    """Copy the ``(offset, length)`` spans of ``pack`` into a new pack ``new_key`` in offset order (bytes as they
    are, no re-encoding); returns each span's new offset. Used by gc to compact mostly-dead packs."""
    moved: dict[tuple[int, int], int] = {}
    with PackWriter(storage, new_key) as writer:
        for off, length in sorted(spans):
            moved[(off, length)] = writer.append([storage.read_range(pack, off, length)] if length else [])[0]
        writer.commit()
    return moved
