"""Codecs: how one tensor becomes stored bytes and back. See :mod:`ckptstore.codecs.base` for the interface."""

from ckptstore.codecs.base import ArrayCodec, BytesCodec, Codec, TensorSpec, from_record, register, registered
from ckptstore.codecs.chain import Encoded, decode, encode

__all__ = [
    "ArrayCodec",
    "BytesCodec",
    "Codec",
    "Encoded",
    "TensorSpec",
    "decode",
    "encode",
    "from_record",
    "register",
    "registered",
]
