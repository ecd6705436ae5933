"""Storage backends behind one small interface: local disk by default, anything fsspec speaks for the rest."""

from __future__ import annotations

import os
from typing import Any

from ckptstore.storage.base import Storage, Writer
from ckptstore.storage.local import LocalStorage


def open_storage(location: str | os.PathLike[str], **storage_options: Any) -> Storage:
    """A plain path (or ``file://``) gives :class:`LocalStorage`; any other URL goes through fsspec.

    ``read_only=True`` (any backend) wraps the result in :class:`ReadOnlyStorage`."""
    loc = os.fspath(location)
    if str(storage_options.pop("read_only", False)).lower() not in ("false", "0", "no", "", "none"):
        from ckptstore.storage.readonly import ReadOnlyStorage

        return ReadOnlyStorage(open_storage(loc, **storage_options))
    if "://" in loc and not loc.startswith("file://"):
        from ckptstore.storage.remote import FsspecStorage

        return FsspecStorage(loc, **storage_options)
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    return LocalStorage(loc)


__all__ = ["LocalStorage", "Storage", "Writer", "open_storage"]
