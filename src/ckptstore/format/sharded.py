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


def full_names(layout: Mapping[str, Any]) -> dict[str, list[str]]:
    """Full tensor name -> the shard tensors it is assembled from."""
    return {
        it["name"]: [c["tensor"] for c in it["chunks"]] for it in items(layout).values() if it["kind"] == "tensor"
    }


def assemble(layout: Mapping[str, Any], shards: Mapping[str, Leaf], names: Iterable[str] | None = None) -> dict[
    str, Leaf
]:
    """The full tensors (by full name) put together from their shard leaves, bit-exactly."""
    wanted = None if names is None else set(names)
    out: dict[str, Leaf] = {}
    for fqn, it in items(layout).items():
        if it["kind"] != "tensor" or (wanted is not None and it["name"] not in wanted):
            continue
        shape = tuple(int(s) for s in it["shape"])
        chunks = it["chunks"]
        if len(chunks) == 1 and tuple(chunks[0]["sizes"]) == shape:
            leaf = shards[chunks[0]["tensor"]]
            out[it["name"]] = Leaf(it["dtype"], shape, leaf.data, "torch")
            continue
        first = shards[chunks[0]["tensor"]].data
        full = np.empty(shape, dtype=first.dtype)
        covered = 0
        for c in chunks:
            part = shards[c["tensor"]].data
            sizes = tuple(int(s) for s in c["sizes"])
            if part.size != math.prod(sizes) or part.dtype != first.dtype:
                raise FormatError(f"shard {c['tensor']!r} of {fqn!r} does not match its recorded size")
            sl = tuple(slice(int(o), int(o) + s) for o, s in zip(c["offsets"], sizes, strict=True))
            full[sl] = part.reshape(sizes)
            covered += part.size
        if covered != math.prod(shape):
            raise FormatError(f"the shards of {fqn!r} do not cover the tensor exactly once")
        out[it["name"]] = Leaf(it["dtype"], shape, full.reshape(-1), "torch")
    return out
