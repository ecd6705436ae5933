"""A read-only view of any storage: reads pass through, every write is refused before it touches anything.

Used to open released stores (``ckpt release --as-store``) and shared stores one must not change::

    store = ckptstore.open_store("release/store", storage_options={"read_only": True})
    ckpt ls --store release/store -o read_only=true
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ckptstore.errors import CkptStoreError
from ckptstore.storage.base import Storage, Writer


class ReadOnlyStoreError(CkptStoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class ReadOnlyStorage(Storage):
    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url

    def _refuse(self, key: str) -> ReadOnlyStoreError:
        return ReadOnlyStoreError(
            "the store is open read-only", path=f"{self.url}/{key}", hint="open it without read_only to change it"
        )

    def read(self, key: str) -> bytes:
        return self.inner.read(key)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.read_range(key, start, length)

    def read_view(self, key: str, start: int, length: int) -> bytes | memoryview:
        return self.inner.read_view(key, start, length)

    def write(self, key: str, data: bytes) -> None:
        raise self._refuse(key)

    def create(self, key: str, data: bytes) -> None:
        raise self._refuse(key)

    def open_writer(self, key: str) -> Writer:
        raise self._refuse(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def mtime(self, key: str) -> float | None:
        return self.inner.mtime(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        raise self._refuse(key)

    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        raise self._refuse(key)
        yield  # pragma: no cover

    def close(self) -> None:
        self.inner.close()
