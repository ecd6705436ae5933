"""Codecs: how one tensor becomes stored bytes and back. See :mod:`ckptstore.codecs.base` for the interface."""

from ckptstore.codecs import lossy as lossy  # registers lossy-q (the archive tier's codec)
from ckptstore.codecs.base import ArrayCodec, BytesCodec, Codec, TensorSpec, from_record, register, registered
from ckptstore.codecs.chain import DEFAULT_BYTES_CODEC, Encoded, bytes_codec, decode, encode
from ckptstore.codecs.planes import DEFAULT_LEVEL

__all__ = [
    "DEFAULT_BYTES_CODEC",
    "DEFAULT_LEVEL",
    "ArrayCodec",
    "BytesCodec",
    "Codec",
    "Encoded",
    "TensorSpec",
    "bytes_codec",
    "decode",
    "encode",
    "from_record",
    "register",
    "registered",
]
