"""Sharded checkpoints (written by several processes through torch.distributed.checkpoint): the manifest's
``dcp`` section and how the full tensors are put back together from their shards, without torch.

A sharded checkpoint stores every shard (DCP *chunk*) as a tensor of its own, named ``<name>/@<offsets>``
(``model/visual.conv1.weight/@0,0``; a byte item is ``<name>/@bytes``), where ``<name>`` is the tensor's path
in the original state dict joined by ``/`` — the name a one-process ``Store.save`` of the same state would
give it. The ``dcp`` section maps each DCP key (the flattened, dotted ``fqn``) to its name, dtype, full shape and
chunks (docs/dcp.md, docs/format.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import xxhash

from ckptstore.errors import FormatError
from ckptstore.format.tree import Leaf

LAYOUT_VERSION = 1


def shard_name(name: str, offsets: Iterable[int]) -> str:
    """The tensor name of the chunk of tensor ``name`` that starts at ``offsets``."""
    return f"{name}/@{','.join(str(int(o)) for o in offsets)}"


def bytes_name(name: str) -> str:
    return f"{name}/@bytes"


def items(layout: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(layout, Mapping) or int(layout.get("version", 0)) > LAYOUT_VERSION:
        raise FormatError("unsupported or damaged 'dcp' section in the manifest", hint="upgrade ckptstore")
    out: dict[str, dict[str, Any]] = layout.get("items", {})
    return out


def full_tensors(layout: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The full tensors of a sharded checkpoint as the manifest's ``tensors`` table lists plain ones: name ->
    ``dtype``, ``shape``, ``object`` and ``chunks`` (each: the shard's ``tensor`` name, ``offsets``, ``sizes``).
    ``object`` identifies the content: the shard's own object id when one chunk covers the whole tensor (then it
    *is* the full tensor's content hash), else ``dcp:`` + a hash over the chunks' offsets and object ids (equal
    ids: equal tensors; a re-sharded equal tensor gets another id)."""
    out: dict[str, dict[str, Any]] = {}
    for it in items(layout).values():
        if it["kind"] != "tensor":
            continue
        shape = [int(s) for s in it["shape"]]
        chunks = it["chunks"]
        try:
            oids = [str(shards[c["tensor"]]["object"]) for c in chunks]
        except KeyError as exc:
            raise FormatError(f"the 'dcp' section names shard {exc.args[0]!r}, which the manifest lacks") from None
        if len(chunks) == 1 and [int(s) for s in chunks[0]["sizes"]] == shape:
            oid = oids[0]
        else:
            h = xxhash.xxh3_128()
            for c, o in zip(chunks, oids, strict=True):
                h.update(f"{','.join(str(int(x)) for x in c['offsets'])}={o};".encode())
            oid = "dcp:" + h.hexdigest()
        out[it["name"]] = {
            "dtype": it["dtype"],
            "shape": shape,
            "object": oid,
            "chunks": [
                {"tensor": c["tensor"], "offsets": [int(o) for o in c["offsets"]],
                 "sizes": [int(z) for z in c["sizes"]]}
                for c in chunks
            ],
        }  # fmt: skip
    return out


def assemble_one(name: str, full: Mapping[str, Any], shards: Mapping[str, Leaf]) -> Leaf:
    """Full tensor ``name`` (a :func:`full_tensors` record) put together from its shard leaves, bit-exactly."""
    shape = tuple(int(s) for s in full["shape"])
    chunks = full["chunks"]
    if len(chunks) == 1 and tuple(int(s) for s in chunks[0]["sizes"]) == shape:
        leaf = shards[chunks[0]["tensor"]]
        return Leaf(full["dtype"], shape, leaf.data, "torch")
    if not chunks:
        raise FormatError(f"sharded tensor {name!r} has no chunks")
    first = shards[chunks[0]["tensor"]].data
    out = np.empty(shape, dtype=first.dtype)
    covered = 0
    for c in chunks:
        part = shards[c["tensor"]].data
        sizes = tuple(int(s) for s in c["sizes"])
        if part.size != math.prod(sizes) or part.dtype != first.dtype:
            raise FormatError(f"shard {c['tensor']!r} of {name!r} does not match its recorded size")
        sl = tuple(slice(int(o), int(o) + s) for o, s in zip(c["offsets"], sizes, strict=True))
        if any(s.start < 0 or s.stop > n for s, n in zip(sl, shape, strict=True)):
            raise FormatError(f"shard {c['tensor']!r} of {name!r} lies outside the tensor's shape {list(shape)}")
        out[sl] = part.reshape(sizes)
        covered += part.size
    if covered != math.prod(shape):
        raise FormatError(f"the shards of {name!r} do not cover the tensor exactly once")
    return Leaf(full["dtype"], shape, out.reshape(-1), "torch")
