"""A bounded local disk cache of byte ranges read from a remote store.

Only keys that are written once and never changed can be cached safely; for a ckptstore store these are the
pack files (``packs/...``: every write makes a new key with a random id, format §9). Manifests change in place
(metadata edits, rebase, repack) and are always read from the remote.

Each entry is one file ``<root>/<namespace>/<2 hex>/<sha256 of key:start:length>`` holding an 8-byte XXH3-64 of
the data followed by the data; a damaged entry is dropped and re-read. Entries are written to a temporary file
and renamed into place, so concurrent processes can share a cache. Least-recently-used entries are evicted once
the total passes ``max_bytes`` (recency is the file's mtime, touched on every hit). The bound is kept by this
process; several processes sharing one cache may overshoot it briefly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from pathlib import Path

import xxhash

_HEADER = 8


def default_cache_root() -> Path:
    """``$CKPTSTORE_REMOTE_CACHE``, else ``~/.cache/ckptstore/remote``."""
    env = os.environ.get("CKPTSTORE_REMOTE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ckptstore" / "remote"


class ReadCache:
    def __init__(self, root: str | os.PathLike[str], namespace: str, max_bytes: int) -> None:
        self.dir = Path(root).expanduser() / hashlib.sha256(namespace.encode()).hexdigest()[:24]
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes on disk, found by a scan on first use
        self.hits = 0
        self.misses = 0

    def _path(self, key: str, start: int, length: int) -> Path:
        h = hashlib.sha256(f"{key}\0{start}\0{length}".encode()).hexdigest()
        return self.dir / h[:2] / h

    def _scan(self) -> int:
        total = 0
        if self.dir.is_dir():
            for p in self.dir.glob("*/*"):
                with contextlib.suppress(OSError):
                    total += p.stat().st_size
        return total

    def get(self, key: str, start: int, length: int) -> bytes | None:
        p = self._path(key, start, length)
        try:
            raw = p.read_bytes()
        except OSError:
            self.misses += 1
            return None
        data = raw[_HEADER:]
        if len(data) != length or raw[:_HEADER] != xxhash.xxh3_64_digest(data):
            with contextlib.suppress(OSError):
                p.unlink()
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(p)
        self.hits += 1
        return data

    def contains(self, key: str, start: int, length: int) -> bool:
        return self._path(key, start, length).is_file()

    def put(self, key: str, start: int, length: int, data: bytes) -> None:
        size = len(data) + _HEADER
        if size > self.max_bytes // 4:  # one huge object would flush everything else
            return
        p = self._path(key, start, length)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.tmp-{uuid.uuid4().hex[:12]}")
            with open(tmp, "wb") as f:
                f.write(xxhash.xxh3_64_digest(data))
                f.write(data)
            os.replace(tmp, p)
        except OSError:  # a full or read-only cache disk only costs speed
            return
        with self._lock:
            if self._total is None:
                self._total = self._scan()
            else:
                self._total += size
            if self._total > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        entries = []
        for p in self.dir.glob("*/*"):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        target = int(self.max_bytes * 0.9)
        for _, size, p in entries:
            if total <= target:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size
        self._total = total

    def clear(self) -> None:
        with self._lock:
            for p in self.dir.glob("*/*"):
                with contextlib.suppress(OSError):
                    p.unlink()
            self._total = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            if self._total is None:
                self._total = self._scan()
            return self._total
