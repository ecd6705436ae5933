"""The storage interface: a few primitives over keys (``/``-separated paths relative to the store root).

Everything the store does is built on these. A backend only has to guarantee that ``write``/``commit`` make a key
appear whole or not at all, and that ``create`` refuses to replace an existing key (the commit of a manifest).

A minimal in-memory backend, as a worked example::

    class MemoryStorage(Storage):
        def __init__(self): self.d = {}
        url = "memory://"
        def read(self, key): return self.d[key]
        def read_range(self, key, start, length): return self.d[key][start:start + length]
        def write(self, key, data): self.d[key] = bytes(data)
        def create(self, key, data):
            if key in self.d: raise ConcurrentCommitError(...)
            self.d[key] = bytes(data)
        def open_writer(self, key): ...  # a Writer that buffers, then write(key) on commit
        def exists(self, key): return key in self.d
        def size(self, key): return len(self.d[key])
        def list(self, prefix): return sorted(k for k in self.d if k.startswith(prefix))
        def delete(self, key): self.d.pop(key, None)
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any


class Writer(ABC):
    """A streaming write of one key that becomes visible only on :meth:`commit`."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the key durable and visible (fsync + rename, or upload completion)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; the key stays as it was."""

    @property
    @abstractmethod
    def tell(self) -> int: ...

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class FileWriter(Writer):
    """A writer that streams into a local file object ``self.f`` (a temp file or a spool) and counts its bytes; the
    subclass says what :meth:`commit` does with it (rename into place, or upload)."""

    f: Any
    _pos: int = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self._pos += len(data)

    @property
    def tell(self) -> int:
        return self._pos


class Storage(ABC):
    url: str

    @abstractmethod
    def read(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes: ...

    def read_view(self, key: str, start: int, length: int) -> bytes | memoryview:
        """Like :meth:`read_range`, for a reader that only looks at the bytes while it decodes them: local disk
        maps the file instead of copying it (the decoder then reads the page cache directly)."""
        return self.read_range(key, start, length)

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key``."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> None:
        """Atomically create ``key``; raise :class:`ConcurrentCommitError` if it exists."""

    @abstractmethod
    def open_writer(self, key: str) -> Writer: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    def mtime(self, key: str) -> float | None:
        """Modification time (seconds since the epoch) where the backend knows it."""
        return None

    def abort_abandoned_uploads(self, prefix: str) -> int:
        """Abort the incomplete uploads under ``prefix`` that a dead writer left (object stores' multipart
        uploads); how many. Called by the store-wide gc. Backends without such uploads have none."""
        return 0

    @contextlib.contextmanager
    def prefetch(self, ranges: Iterable[tuple[str, int, int]]) -> Iterator[None]:
        """A hint: the ``(key, start, length)`` ranges will be read inside this block. Object stores fetch them
        in a few large parallel requests instead of one per range; local disk has nothing to gain."""
        yield

    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        """A writer lock on ``key``: exclusive, or ``shared`` with other shared holders (and exclusive against
        an exclusive holder). A held lock raises :class:`~ckptstore.errors.StoreLockedError` at once; waiting is
        the caller's choice. Backends without locks rely on ``create`` for commit safety."""
        yield

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
