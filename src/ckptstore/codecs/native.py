"""Many small payloads decoded in one C call (the load path's accelerator for tensors under 4 MB).

A checkpoint's hundreds of tensors between a few KB and 4 MB cost more in Python than in zstd when each goes
through :func:`ckptstore.codecs.chain.decode` (codec objects, plane arrays, one zstd call per plane, a kernel
call), and that Python runs serially on the GIL while the C work could run on every core. :func:`plan` turns the
common chains into plain arguments (a planes-zstd keyframe, or one float32 delta against an already-decoded
base), and :func:`decode_many` decodes a batch of them under one release of the GIL (``_kernels.decode_many``).

It is an accelerator, not a second decoder: it produces the same bytes as the chain (tests/codecs/
test_native.py compares them), and every payload it does not handle or finds malformed is reported back, to be
decoded by the chain, which raises the error a user sees. zstd is the zstandard package's own library, reached
through its cffi module; without it (or without the C kernels) :data:`available` is False and nothing changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckptstore.codecs.base import TensorSpec, from_record
from ckptstore.codecs.chain import split_side
from ckptstore.codecs.delta import OrderedDelta
from ckptstore.codecs.planes import BytePlanesZstd, kernels
from ckptstore.errors import CodecError

__all__ = ["available", "decode_many", "plan"]

Item = tuple[Any, int, np.ndarray, "np.ndarray | None", np.ndarray, int, int]


def _bind() -> bool:
    if kernels is None or not hasattr(kernels, "decode_many"):
        return False
    try:
        from zstandard import _cffi  # type: ignore[attr-defined]  # the package's cffi build of its own zstd
    except ImportError:  # cffi missing, or a zstandard built without it
        return False
    ffi, lib = _cffi.ffi, _cffi.lib
    names = ("ZSTD_decompressDCtx", "ZSTD_getFrameContentSize", "ZSTD_isError", "ZSTD_createDCtx", "ZSTD_freeDCtx")
    try:
        kernels.bind_zstd(*(int(ffi.cast("uintptr_t", ffi.addressof(lib, n))) for n in names))
    except (AttributeError, TypeError, ValueError):
        return False
    return True


available: bool = _bind()

_NO_SCALES = np.zeros(0, np.float32)


def plan(
    payload: memoryview | bytes, records: Sequence[Mapping[str, Any]], spec: TensorSpec, prev: np.ndarray | None
) -> tuple[Item, np.ndarray] | None:
    """``(item, out)`` for :func:`decode_many` when the chain is one it decodes: planes-zstd alone (``prev``
    None), or ``delta`` then planes-zstd on float32 with ``prev`` the decoded base; None otherwise (the chain
    then decodes it). The records are read as the chain reads them (:func:`from_record`, the delta's own kernel
    arguments). ``out`` is the fresh array the item fills."""
    k = spec.dt.itemsize
    if not available or not records or spec.dtype == "complex128" or k not in (1, 2, 4, 8) or spec.size == 0:
        return None
    try:
        *stages, last = [from_record(r) for r in records]
    except CodecError:
        return None
    if not isinstance(last, BytePlanesZstd) or len(stages) > 1 or bool(stages) != (prev is not None):
        return None
    view = memoryview(payload)
    scales, rows, mode = _NO_SCALES, 0, 0
    if stages:
        delta = stages[0]
        assert prev is not None
        if not isinstance(delta, OrderedDelta) or prev.dtype != np.uint32 or prev.size != spec.size:
            return None
        if not prev.flags.c_contiguous:
            return None
        try:
            if records[0].get("config", {}).get("side"):
                side, view = split_side(view)
                delta.load_side(bytes(side))
            kargs = delta.kernel_args(spec)
        except CodecError:
            return None
        if kargs is None:  # not float32
            return None
        scales, rows, mode = kargs
    out = np.empty(spec.size, dtype=f"<u{k}")
    return (view, k, out, prev, scales, rows, mode), out


def decode_many(items: Sequence[Item]) -> bytes:
    """Decode every item (from :func:`plan`) into its ``out``; one status byte per item, 0 decoded, 1 not (the
    chain must decode that one: it may be damaged, or in a form this does not handle)."""
    status: bytes = kernels.decode_many(items)
    return status
