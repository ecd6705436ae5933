"""Fault injection for the storages' write paths (tests and benchmarks only; off unless a hook is set).

Every write the local backend does passes named points, in order: ``open`` (the temp file), ``write`` (each
chunk), ``flush``, ``fsync``, ``rename`` (or ``link`` for an exclusive create), ``dirsync``. A hook set with
:func:`injected` is called at each one with the point, the key and the bytes about to be written (``write``
only); it may raise (an ``OSError`` such as ``ENOSPC``) or, at ``write``, return a shorter length to make the
write short (the rest of the chunk is silently dropped, as a broken disk or filesystem might).

The fsspec backend (S3 and the rest) passes one point before each write request it makes: ``put`` (a plain
put: a small pack, a manifest rewrite, a lease renewal), ``create`` (a conditional put: a manifest commit, a
lock taken), ``mpu-start``, ``part`` (each part of a multipart upload, from the upload threads), ``complete``,
``abort`` and ``delete`` (a pack freed, a lock released). The hook may raise there (the request is then not
made); its return value is ignored.

Example::

    def full_at_third_write(point, key, data):
        nonlocal n
        if point == "write" and (n := n + 1) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    with faults.injected(full_at_third_write):
        store.save("run", 5, state)   # -> StorageWriteError, earlier checkpoints intact
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

Hook = Callable[[str, str, "bytes | memoryview | None"], "int | None"]

_hook: Hook | None = None
_lock = threading.Lock()

POINTS = ("open", "write", "flush", "fsync", "rename", "link", "dirsync")
REMOTE_POINTS = ("put", "create", "mpu-start", "part", "complete", "abort", "delete")


def point(name: str, key: str, data: bytes | memoryview | None = None) -> int | None:
    """Called by the backend at each write point: the hook's verdict (a short length at ``write``), or None."""
    hook = _hook
    if hook is None:
        return None
    with _lock:  # the hook sees one point at a time, in order, even with parallel writers
        return hook(name, key, data)


@contextlib.contextmanager
def injected(hook: Hook) -> Iterator[None]:
    """Call ``hook`` at every write point of every store in this process while the block runs."""
    global _hook
    if _hook is not None:
        raise RuntimeError("a fault hook is already installed")
    _hook = hook
    try:
        yield
    finally:
        _hook = None
