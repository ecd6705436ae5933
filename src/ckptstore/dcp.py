"""torch.distributed.checkpoint (DCP) into the store: a ``StorageWriter`` / ``StorageReader`` pair.

    dcp.save(state_dict, storage_writer=StoreWriter("s3://bucket/store", "clip", step))
    dcp.load(state_dict, storage_reader=StoreReader("s3://bucket/store", "clip@latest"))

DCP plans which rank writes which chunk (its dedup planner gives each chunk one writer); every rank then writes
its chunks as objects of the store into a pack of its own (:meth:`Store.write_shards`: content-addressed, delta
coded against the same chunk of the previous checkpoint), and the coordinator commits one manifest last
(:meth:`Store.commit_shards`). Until that commit nothing is visible; a rank that dies leaves orphan packs that
``ckpt gc`` frees. Loading reads only the chunks overlapping each rank's shards, so any number of ranks with any
sharding can load. Key mapping and limits: docs/dcp.md.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptstore.errors import CheckpointExistsError, FormatError, InvalidStateError
from ckptstore.format import sharded
from ckptstore.format.names import check_run_name, check_step
from ckptstore.format.tree import Leaf, flatten
from ckptstore.metadata import validate as validate_metadata
from ckptstore.refs import parse_ref
from ckptstore.store import Manifest, Store, open_store
from ckptstore.torch import _NAME_TO_TORCH, _TORCH_TO_NAME, leaf_to_tensor, tensor_to_leaf

__all__ = ["StoreReader", "StoreWriter"]

# One open Store per (process, location): it keeps the last checkpoint's shards as the next save's delta
# bases, so a training loop saving through DCP does not read its own checkpoints back.
_OPEN: dict[tuple[str, int], Store] = {}


def _open(location: str | os.PathLike[str] | Store, storage_options: dict[str, Any] | None) -> Store:
    if isinstance(location, Store):
        return location
    key = (os.fspath(location), os.getpid())
    store = _OPEN.get(key)
    if store is None:
        store = _OPEN[key] = open_store(location, storage_options=storage_options or {})
    return store


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _tensor_name(fqn: str, path: Any) -> str:
    """The store's name of a DCP key: its path in the original (nested) state dict joined by ``/``."""
    parts = [str(p) for p in path] if isinstance(path, list | tuple) and path else [fqn]
    return "/".join(parts)


def _plain_value(raw: bytes) -> tuple[bool, Any]:
    """A byte item (DCP ``torch.save``s non-tensor values) as a JSON skeleton, when it is a plain value."""
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
        skeleton, leaves = flatten({"v": value})
    except Exception:  # any value the restricted loader or the tree refuses stays a byte item only
        return False, None
    return (not leaves), skeleton["v"] if not leaves else None


class StoreWriter(StorageWriter):
    """Write a DCP checkpoint as checkpoint ``run@step`` of the store at ``store`` (a path, URL or Store)."""

    def __init__(
        self,
        store: str | os.PathLike[str] | Store,
        run: str,
        step: int,
        metadata: dict[str, Any] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.location = store
        self.run = check_run_name(run)
        self.step = check_step(step)
        self.metadata = validate_metadata(metadata)
        self.storage_options = storage_options
        self.is_coordinator = False

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:  # "run@step" chooses another checkpoint of the same store
            r = parse_ref(str(checkpoint_id))
            if r.kind != "step":
                raise InvalidStateError(f"checkpoint_id {checkpoint_id!r} must be run@STEP")
            self.run, self.step = r.run, check_step(int(str(r.value)))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            return parse_ref(str(checkpoint_id)).kind == "step"
        except Exception:
            return False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def _store(self) -> Store:
        return _open(self.location, self.storage_options)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator picks the delta base once, so every rank codes against the same checkpoint.
        store = self._store()
        steps = store.steps(self.run)
        if self.step in steps:
            raise CheckpointExistsError(
                f"checkpoint {self.run}@{self.step} already exists",
                ref=f"{self.run}@{self.step}",
                hint="save under another step, or delete it first (`ckpt rm`)",
            )
        earlier = [s for s in steps if s < self.step]
        job = uuid.uuid4().hex[:8]
        return [
            dataclasses.replace(p, storage_data={"base": earlier[-1] if earlier else None, "writer": f"r{i}-{job}"})
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        names = planner_paths(planner)
        leaves: dict[str, Leaf] = {}
        results: list[WriteResult] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            name = _tensor_name(item.index.fqn, names.get(item.index.fqn))
            extra: dict[str, Any] = {}
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data.read())  # type: ignore[attr-defined]
                key = sharded.bytes_name(name)
                leaves[key] = Leaf("uint8", (len(raw),), np.frombuffer(raw, np.uint8).copy(), "torch")
                plain, value = _plain_value(raw)
                if plain:
                    extra["value"] = value
            else:
                offsets = item.index.offset if item.index.offset is not None else ()
                key = sharded.shard_name(name, offsets)
                leaves[key] = tensor_to_leaf(data)
            results.append(
                WriteResult(index=item.index, size_in_bytes=leaves[key].nbytes, storage_data={"tensor": key, **extra})
            )
        if results:
            part = self._store().write_shards(self.run, self.step, leaves, info["base"], writer=info["writer"])
            results[0].storage_data["part"] = part
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        parts = [r.storage_data["part"] for rs in results for r in rs if "part" in r.storage_data]
        written = {r.index.fqn: r.storage_data.get("value") for rs in results for r in rs}
        layout, tree = layout_and_tree(metadata, written)
        extra = {"dcp": {"version": sharded.LAYOUT_VERSION, "items": layout}}
        self._store().commit_shards(self.run, self.step, parts, tree, self.metadata, extra=extra)

    def storage_meta(self) -> Any:
        return None


def planner_paths(planner: Any) -> dict[str, Any]:
    """DCP key -> path in the original nested state dict (the default planner's flattening mappings)."""
    mappings = getattr(planner, "mappings", None)
    return mappings if isinstance(mappings, dict) else {}


class _Value:
    """A leaf of the state tree being rebuilt from DCP keys (so the walk does not descend into it)."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v


def layout_and_tree(metadata: Metadata, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``dcp`` items and the state tree of a DCP checkpoint described by ``metadata``; ``values``
    maps the fqn of a plain byte item to its JSON skeleton (``None``: not a plain value).

    The tree has the original nesting (DCP's planner mappings): list indices become lists again, and an optimizer's
    ``state`` (a dict beside ``param_groups`` keyed by digits) gets back its int keys, as ``Optimizer.state_dict``
    has them; DCP itself turns every dict key into a string."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    layout: dict[str, Any] = {}
    root: dict[Any, Any] = {}
    order = [f for f in paths if f in metadata.state_dict_metadata]  # the planner's: the state dict's own order
    order += [f for f in metadata.state_dict_metadata if f not in paths]
    for fqn in order:
        md = metadata.state_dict_metadata[fqn]
        path = list(paths.get(fqn) or [fqn])
        name = _tensor_name(fqn, path)
        if isinstance(md, TensorStorageMetadata):
            dtype = _TORCH_TO_NAME.get(md.properties.dtype)
            if dtype is None:
                raise InvalidStateError(f"unsupported dtype {md.properties.dtype} of {fqn!r}")
            layout[fqn] = {
                "kind": "tensor",
                "name": name,
                "dtype": dtype,
                "shape": list(md.size),
                "requires_grad": bool(md.properties.requires_grad),
                "chunks": [
                    {"offsets": list(c.offsets), "sizes": list(c.sizes), "tensor": sharded.shard_name(name, c.offsets)}
                    for c in md.chunks
                ],
            }
            value: Any = {"$tensor": name}
        else:
            layout[fqn] = {"kind": "bytes", "name": name, "tensor": sharded.bytes_name(name)}
            value = values.get(fqn)
        _insert(root, path, _Value(value), fqn)
    tree = _encode(root, [])
    if not isinstance(tree, dict):
        raise InvalidStateError("the DCP state dict is not a dict at its top level")
    return layout, tree


def _insert(root: dict[Any, Any], path: list[Any], value: _Value, fqn: str) -> None:
    node = root
    for p in path[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise InvalidStateError(f"state dict key {fqn!r} collides with another key")
        node = nxt
    if path[-1] in node:
        raise InvalidStateError(f"state dict key {fqn!r} collides with another key")
    node[path[-1]] = value


def _encode(node: Any, where: list[str], int_keys: bool = False) -> Any:
    if isinstance(node, _Value):
        return node.v
    keys = list(node)
    here = "/".join(where) or "the top level"
    if keys and all(isinstance(k, int) for k in keys):  # list elements
        if sorted(keys) != list(range(len(keys))):
            raise InvalidStateError(f"list at {here} has items {sorted(keys)}, not 0..{len(keys) - 1}")
        return [_encode(node[i], [*where, str(i)]) for i in range(len(keys))]
    if not all(isinstance(k, str) and not k.startswith("$") for k in keys):
        raise InvalidStateError(f"state dict keys at {here} mix list indices and names, or start with '$'")
    if int_keys and keys and all(k.isdigit() for k in keys):
        return {"$dict": [[int(k), _encode(node[k], [*where, k])] for k in keys]}
    optimizer = "param_groups" in node  # torch.optim's state_dict: its "state" is keyed by int
    return {k: _encode(v, [*where, k], optimizer and k == "state") for k, v in node.items()}


class StoreReader(StorageReader):
    """Read checkpoint ``ref`` (``run@step``, ``run@latest``, ...) of the store at ``store`` through DCP."""

    def __init__(
        self,
        store: str | os.PathLike[str] | Store,
        ref: str,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.location = store
        self.ref = ref
        self.storage_options = storage_options
        self._manifest: Manifest | None = None
        self.storage_data: dict[MetadataIndex, str] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.ref = str(checkpoint_id)
        self._manifest = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            parse_ref(str(checkpoint_id))
            return True
        except Exception:
            return False

    def _store(self) -> Store:
        return _open(self.location, self.storage_options)

    def manifest(self) -> Manifest:
        if self._manifest is None:
            m = self._store().resolve(self.ref)
            if "dcp" not in m.data:
                raise FormatError(
                    f"{m.ref} was not saved through DCP",
                    path=m.key,
                    hint="load it with Store.load / ckptstore.torch.restore",
                )
            self._manifest = m
        return self._manifest

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        m = self.manifest()
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, str] = {}
        planner: dict[str, tuple[str, ...]] = {}
        for fqn, it in sharded.items(m.data["dcp"]).items():
            planner[fqn] = tuple(it["name"].split("/"))
            if it["kind"] == "tensor":
                chunks = [
                    ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                    for c in it["chunks"]
                ]
                props = TensorProperties(dtype=_NAME_TO_TORCH[it["dtype"]], requires_grad=bool(it["requires_grad"]))
                state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(it["shape"]), chunks=chunks)
                for c in it["chunks"]:
                    storage[MetadataIndex(fqn, torch.Size(c["offsets"]))] = c["tensor"]
            else:
                state[fqn] = BytesStorageMetadata()
                storage[MetadataIndex(fqn)] = it["tensor"]
        self.storage_data = storage
        return Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        m = self.manifest()
        wanted = list(dict.fromkeys(self.storage_data[req.storage_index] for req in plan.items))
        leaves = self._store().load_leaves(m, wanted) if wanted else {}  # hashed: every load checks its bytes
        for req in plan.items:
            leaf = leaves[self.storage_data[req.storage_index]]
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(leaf.data.tobytes()))
                continue
            tensor = narrow_tensor_by_index(leaf_to_tensor(leaf), req.storage_offsets, req.lengths)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise FormatError(
                    f"chunk {req.storage_index.fqn} has size {tuple(tensor.size())}, expected {tuple(target.size())}",
                    path=m.key,
                )
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
