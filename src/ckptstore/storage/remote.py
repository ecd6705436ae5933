"""Storage on anything fsspec speaks (``s3://``, ``gs://``, ``memory://`` ...).

Object stores have no rename, so a key is written in one upload (multipart for large packs) that becomes visible
only when it completes. ``create`` (the manifest commit) checks for an existing key first; on a store that
supports conditional puts this check is atomic, elsewhere two writers racing on the *same* run and step is a
documented limit (docs/format.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ckptstore.errors import ConcurrentCommitError, MissingDependencyError
from ckptstore.storage.base import Storage, Writer

_INSTALL_HINTS = {
    "s3": "pip install s3fs",
    "s3a": "pip install s3fs",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
}


class _FsspecWriter(Writer):
    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.f = fs.open(path, "wb")
        self._pos = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self._pos += len(data)

    @property
    def tell(self) -> int:
        return self._pos

    def commit(self) -> None:
        self.f.close()

    def abort(self) -> None:
        # An unfinished multipart upload is discarded by not completing it.
        with contextlib.suppress(Exception):
            if hasattr(self.f, "discard"):
                self.f.discard()
            else:
                self.f.close()
                self.fs.rm(self.path)


class FsspecStorage(Storage):
    def __init__(self, url: str, **storage_options: Any) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a hard dependency
            raise MissingDependencyError("fsspec is required for remote stores") from exc
        protocol = url.split("://", 1)[0]
        try:
            fs, path = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            hint = _INSTALL_HINTS.get(protocol, f"install the fsspec implementation for {protocol!r}")
            raise MissingDependencyError(f"cannot open {url}: {exc}", hint=hint) from None
        self.fs = fs
        self.root = path.rstrip("/")
        self.url = url

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(self._p(key))
        return data

    def read_range(self, key: str, start: int, length: int) -> bytes:
        data: bytes = self.fs.cat_file(self._p(key), start=start, end=start + length)
        if len(data) != length:
            raise EOFError(f"{key}: wanted {length} bytes at {start}, got {len(data)}")
        return data

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def create(self, key: str, data: bytes) -> None:
        if self.exists(key):
            raise ConcurrentCommitError(
                "already exists", path=f"{self.url}/{key}", hint="another writer committed it first"
            )
        self.fs.pipe_file(self._p(key), data)

    def open_writer(self, key: str) -> Writer:
        return _FsspecWriter(self.fs, self._p(key))

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache(self._p(key))
        return bool(self.fs.exists(self._p(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._p(key)))

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        n = len(self.root) + 1
        return sorted(p[n:] for p in found)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(key))
