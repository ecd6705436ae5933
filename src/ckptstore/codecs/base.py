"""The codec interface and its registry.

An object is stored as its tensor passed through a *codec chain*: zero or more array→array codecs (which may use
reference tensors, e.g. the same tensor in the previous checkpoint), then at most one array→bytes codec. An empty
chain means raw little-endian bytes. Each codec writes a record ``{"name", "version", "config"}`` into the object's
entry in the manifest, so stored data always says how to read it back.

A worked example of a codec (array→array, no references)::

    class Negate(ArrayCodec):
        name = "negate"
        def encode(self, words, spec, refs):
            return np.negative(words)
        def decode(self, words, spec, refs):
            return np.negative(words)

    register(Negate)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ckptstore.errors import CodecError
from ckptstore.format import dtypes


@dataclass(frozen=True)
class TensorSpec:
    """What a codec knows about the tensor it codes."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def dt(self) -> dtypes.DType:
        return dtypes.dtype(self.dtype)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * (2 if self.dtype == "complex128" else 1)

    @property
    def nbytes(self) -> int:
        return self.size * self.dt.itemsize // (2 if self.dtype == "complex128" else 1)


class Codec(ABC):
    """Common part of every codec: a name, a version and a JSON config that round-trips."""

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        return cls(**config)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "config": self.config()}


class ArrayCodec(Codec):
    """Words → words of the same width and count (a reversible transform, possibly using reference tensors).

    ``refs`` maps the roles this codec declared in :meth:`ref_roles` to the reference tensors' words.
    """

    def ref_roles(self) -> tuple[str, ...]:
        return ()

    def side_bytes(self) -> bytes:
        """Per-object data too large for the JSON config (e.g. one scale per row), stored at the head of the
        payload. A codec that has any must put ``"side": true`` in its config."""
        return b""

    def load_side(self, data: bytes) -> None:
        """Receive the bytes :meth:`side_bytes` produced, before :meth:`decode`."""

    @abstractmethod
    def encode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray: ...

    @abstractmethod
    def decode(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def encode_planes(self, words: np.ndarray, spec: TensorSpec, refs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Optional fused path: the encoded words already split into byte planes (``(itemsize, n)`` uint8, the same
        bytes as splitting :meth:`encode`'s output), or None when the codec has none for this input."""
        return None

    def decode_planes(
        self,
        planes: list[np.ndarray],
        spec: TensorSpec,
        refs: Mapping[str, np.ndarray],
        out: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Optional fused path: decode straight from the byte planes of the encoded words (lowest byte first, ``n``
        bytes each), or None when the codec has none for this input. ``out``, when given, is one of ``refs`` that
        the caller no longer needs: the codec may write the result into it (reading each element before writing it),
        so a delta chain reuses one buffer."""
        return None


class BytesCodec(Codec):
    """Words → bytes (the last codec of a chain)."""

    @abstractmethod
    def encode(self, words: np.ndarray, spec: TensorSpec) -> bytes: ...

    @abstractmethod
    def decode(self, payload: memoryview | bytes, spec: TensorSpec) -> np.ndarray: ...

    def record_for(self, payload: Sequence[bytes | memoryview]) -> dict[str, Any]:
        """The record of one payload this codec wrote (its pieces, in order): a codec whose newer versions add
        payload forms records the oldest version that reads this payload, so older readers keep reading it."""
        return self.record()


# Filled by ``@register`` as codec modules are imported; ``import ckptstore.codecs`` (run before any of its
# submodules, this one included) imports the built-in ones, so the registry is full whenever it is read.
_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise CodecError(f"codec name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def from_record(record: Mapping[str, Any]) -> Codec:
    """Instantiate a codec from its stored record, refusing unknown names and newer versions."""
    try:
        name = record["name"]
        version = int(record.get("version", 1))
        config = record.get("config", {})
    except (KeyError, TypeError, ValueError):
        raise CodecError(f"malformed codec record {record!r}") from None
    cls = _REGISTRY.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}", hint="the store was written by a newer ckptstore; upgrade")
    if version > cls.version:
        raise CodecError(
            f"codec {name!r} version {version} is newer than this reader's {cls.version}",
            hint="upgrade ckptstore",
        )
    try:
        return cls.from_config(config)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"bad config for codec {name!r}: {exc}") from None


def registered() -> dict[str, type[Codec]]:
    return dict(_REGISTRY)
