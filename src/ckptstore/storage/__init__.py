"""Storage backends behind one small interface: local disk by default, anything fsspec speaks for the rest."""

from __future__ import annotations

import os
from typing import Any

from ckptstore.storage.base import Storage, Writer
from ckptstore.storage.local import LocalStorage


def open_storage(location: str | os.PathLike[str], **storage_options: Any) -> Storage:
    """A plain path (or ``file://``) gives :class:`LocalStorage`; any other URL goes through fsspec."""
    loc = os.fspath(location)
    if "://" in loc and not loc.startswith("file://"):
        from ckptstore.storage.remote import FsspecStorage

        return FsspecStorage(loc, **storage_options)
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    return LocalStorage(loc)


__all__ = ["LocalStorage", "Storage", "Writer", "open_storage"]
