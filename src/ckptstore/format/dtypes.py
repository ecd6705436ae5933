"""Tensor dtypes the format knows, by their torch-style names, and the numpy type their bytes are held in.

numpy has no bfloat16 or float8, so tensors are always handled as raw little-endian words of the right width; the
dtype name decides how codecs interpret those words (IEEE float, two's-complement int, bool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ckptstore.errors import FormatError


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    kind: str  # "float", "int", "uint", "bool"
    numpy: str  # numpy dtype that holds the *values* (None-like "" when numpy has none)

    @property
    def word(self) -> np.dtype:
        """The unsigned integer type of the same width: codecs work on these words."""
        return np.dtype(f"<u{self.itemsize}")

    @property
    def signed_word(self) -> np.dtype:
        return np.dtype(f"<i{self.itemsize}")


_DTYPES = [
    DType("float64", 8, "float", "<f8"),
    DType("float32", 4, "float", "<f4"),
    DType("float16", 2, "float", "<f2"),
    DType("bfloat16", 2, "float", ""),
    DType("float8_e4m3fn", 1, "float8", ""),
    DType("float8_e5m2", 1, "float8", ""),
    DType("int64", 8, "int", "<i8"),
    DType("int32", 4, "int", "<i4"),
    DType("int16", 2, "int", "<i2"),
    DType("int8", 1, "int", "<i1"),
    DType("uint64", 8, "uint", "<u8"),
    DType("uint32", 4, "uint", "<u4"),
    DType("uint16", 2, "uint", "<u2"),
    DType("uint8", 1, "uint", "<u1"),
    DType("bool", 1, "bool", "?"),
    DType("complex64", 8, "complex", "<c8"),
    DType("complex128", 16, "complex", "<c16"),
]
DTYPES: dict[str, DType] = {d.name: d for d in _DTYPES}

_NUMPY_TO_NAME = {np.dtype(d.numpy): d.name for d in _DTYPES if d.numpy}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r}", hint=f"known dtypes: {', '.join(DTYPES)}") from None


def name_of_numpy(dt: np.dtype) -> str:
    dt = np.dtype(dt).newbyteorder("<") if np.dtype(dt).byteorder == ">" else np.dtype(dt)
    try:
        return _NUMPY_TO_NAME[dt]
    except KeyError:
        raise FormatError(f"numpy dtype {dt} has no ckptstore equivalent") from None


def words(data: np.ndarray, dt: DType) -> np.ndarray:
    """View a C-contiguous array (any dtype of the right itemsize) as flat little-endian unsigned words."""
    flat = np.ascontiguousarray(data).reshape(-1)
    if dt.itemsize == 16:  # complex128: two 8-byte words per element
        return flat.view("<u8")
    return flat.view(dt.word) if flat.dtype.itemsize == dt.itemsize else flat.view(np.uint8).view(dt.word)
