"""DCP checkpoint folders as torch's ``FileSystemWriter`` writes them (``.metadata`` + ``__N_0.distcp``): ingest
one into the store as a sharded checkpoint, and export a checkpoint as one that plain ``dcp.load`` reads.

``.metadata`` is a pickle. It is read with an allow-list unpickler: only DCP's metadata classes, ``torch.Size``,
torch dtypes / layouts / memory formats and ``pathlib`` paths may be named in it; anything else (a forged pickle
calling ``os.system``, ...) is refused with a :class:`~ckptstore.errors.FormatError` naming the file, before the
store is touched. Each item of a ``.distcp`` file is read from its byte range: tensors are ``torch.save``'d per
item and read back with ``torch.load(weights_only=True)`` (through DCP's own stream transforms when the folder was
written with an extension such as ``ZStandard``); byte items are kept as they are. Each ``.distcp`` file (one per
writing rank) becomes one pack of the store, so memory stays at one rank's shards. docs/dcp.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptstore.dcp import _plain_value, _tensor_name, layout_and_tree
from ckptstore.errors import CheckpointExistsError, FormatError, InvalidStateError, OutputPathError
from ckptstore.format import sharded
from ckptstore.format.manifest import Manifest
from ckptstore.format.names import check_run_name, check_step
from ckptstore.format.tree import Leaf
from ckptstore.store import Store
from ckptstore.torch import tensor_to_leaf

__all__ = ["export_folder", "ingest_folder", "is_dcp_folder", "read_metadata"]

METADATA_FILE = ".metadata"

_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_MD, "Metadata"),
    (_MD, "TensorStorageMetadata"),
    (_MD, "BytesStorageMetadata"),
    (_MD, "ChunkStorageMetadata"),
    (_MD, "TensorProperties"),
    (_MD, "MetadataIndex"),
    (_MD, "StorageMeta"),
    (_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``Metadata`` and nothing else: every global the pickle names must be on the allow-list."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            return getattr(torch, name)
        raise FormatError(
            f"DCP metadata names {module}.{name}, which a DCP .metadata file never holds; refused unread",
            path=self.path,
            hint="only .metadata files written by torch.distributed.checkpoint's FileSystemWriter are read; "
            "this one is damaged or forged",
        )


def is_dcp_folder(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def read_metadata(folder: str | os.PathLike[str]) -> Metadata:
    """The ``Metadata`` of a FileSystemWriter folder, through the allow-list unpickler."""
    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, str(path)).load()
    except FormatError:
        raise
    except FileNotFoundError:
        raise FormatError(
            "not a DCP checkpoint folder: no .metadata file", path=str(path), hint="dcp.save writes one"
        ) from None
    except Exception as exc:  # a truncated or foreign pickle: any unpickling error
        raise FormatError(f"cannot read DCP metadata: {type(exc).__name__}: {exc}", path=str(path)) from None
    # getattr: a forged pickle can build a Metadata without its fields (found by fuzzing: AttributeError)
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise FormatError(f"DCP metadata holds a {type(md).__name__}, not a Metadata", path=str(path))
    if not isinstance(getattr(md, "storage_data", None), dict):
        raise FormatError(
            "DCP metadata has no storage map (not written by FileSystemWriter?)",
            path=str(path),
            hint="only FileSystemWriter folders (.metadata + __N_0.distcp) can be ingested",
        )
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(fqn, str) or not isinstance(item, TensorStorageMetadata | BytesStorageMetadata):
            raise FormatError(f"DCP metadata entry {str(fqn)[:80]!r} is not a tensor or bytes item", path=str(path))
        if isinstance(item, TensorStorageMetadata):
            _check_tensor_item(fqn, item, str(path))
    paths = getattr(md, "planner_data", None)
    if paths is not None and not (
        isinstance(paths, dict)
        and all(isinstance(k, str) and isinstance(v, list | tuple) and all(isinstance(p, str | int) for p in v)
                for k, v in paths.items())
    ):  # fmt: skip
        raise FormatError("DCP metadata has a malformed planner map (fqn -> path of keys)", path=str(path))
    return md


def _dims(value: Any) -> bool:
    return isinstance(value, torch.Size | tuple | list) and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in value
    )


def _check_tensor_item(fqn: str, item: Any, path: str) -> None:
    """Every field the ingest reads, of the types DCP writes (found by fuzzing: a forged pickle can build these
    classes with any attributes, or none, and the ingest then failed with AttributeError or TypeError)."""
    props, size, chunks = (getattr(item, a, None) for a in ("properties", "size", "chunks"))
    ok = (
        isinstance(props, TensorProperties)
        and isinstance(getattr(props, "dtype", None), torch.dtype)
        and _dims(size)
        and isinstance(chunks, list)
        and all(
            isinstance(c, ChunkStorageMetadata)
            and _dims(getattr(c, "offsets", None))
            and _dims(getattr(c, "sizes", None))
            and len(c.offsets) == len(c.sizes) == len(size or ())
            for c in chunks
        )
    )
    if not ok:
        raise FormatError(f"DCP metadata of tensor {fqn[:80]!r} is malformed (properties, size or chunks)", path=path)


def _step_of(folder: Path) -> int | None:
    m = re.search(r"(\d+)$", folder.resolve().name)
    return int(m.group(1)) if m else None


def _item_file(folder: Path, info: Any, where: str) -> tuple[str, int, int, list[str]]:
    rel = getattr(info, "relative_path", None)
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    meta = str(folder / METADATA_FILE)
    if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
        raise FormatError(f"DCP metadata puts {where} in file {rel!r}, outside the folder", path=meta)
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
        raise FormatError(f"DCP metadata gives {where} a bad byte range ({offset!r}, {length!r})", path=meta)
    descriptors = list(getattr(info, "transform_descriptors", None) or [])
    return rel, offset, length, descriptors


def _read_range(path: Path, offset: int, length: int, where: str) -> bytes:
    # checked before reading (found by fuzzing: a forged range past 2**63 raised ValueError from seek, and a
    # forged length of terabytes a MemoryError from read)
    if offset < 0 or length < 0 or offset + length > path.stat().st_size:
        raise FormatError(
            f"{where}: the byte range {offset}+{length} is not inside the file", path=str(path), hint="the copy is cut"
        )
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise FormatError(
            f"{where}: the file ends before its byte range {offset}+{length}", path=str(path), hint="the copy is cut"
        )
    return raw


def _untransform(raw: bytes, descriptors: list[str], path: Path) -> bytes:
    if not descriptors:
        return raw
    from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

    try:
        stream: Any = io.BytesIO(raw)
        for ex in ExtensionRegistry().from_descriptor_list(descriptors):
            if isinstance(ex, StreamTransformExtension):
                stream = ex.transform_from(stream)
        return bytes(stream.read())
    except Exception as exc:
        raise FormatError(f"cannot undo DCP transforms {descriptors}: {exc}", path=str(path)) from None


def ingest_folder(
    store: Store,
    folder: str | os.PathLike[str],
    run: str,
    step: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Manifest:
    """Store the DCP checkpoint in ``folder`` (FileSystemWriter layout) as checkpoint ``run@step`` (``step``
    defaults to the trailing digits of the folder's name), delta-coded against the run's previous checkpoint.
    Every chunk is checked against the shape and dtype its metadata records; nothing is committed on any error,
    and this ingest's packs are freed."""
    folder = Path(folder)
    check_run_name(run)
    if step is None:
        step = _step_of(folder)
        if step is None:
            raise InvalidStateError(
                f"cannot tell the step of DCP folder {str(folder)!r} from its name", hint="give --step N"
            )
    check_step(step)
    md = read_metadata(folder)  # refused here, before the store is touched
    steps = store.steps(run)
    if step in steps:
        raise CheckpointExistsError(
            f"checkpoint {run}@{step} already exists", ref=f"{run}@{step}", hint="ingest under another step"
        )
    earlier = [s for s in steps if s < step]
    base = earlier[-1] if earlier else None
    paths = md.planner_data if isinstance(md.planner_data, dict) else {}
    storage: dict[Any, Any] = md.storage_data
    # every chunk of the metadata and where it lies: file -> [(fqn, chunk or None, offset, length, transforms)]
    per_file: dict[str, list[tuple[str, Any, int, int, list[str]]]] = {}
    for fqn, item in md.state_dict_metadata.items():
        chunks = item.chunks if isinstance(item, TensorStorageMetadata) else [None]
        for c in chunks:
            index = MetadataIndex(fqn, c.offsets) if c is not None else MetadataIndex(fqn)
            info = storage.get(index)
            if info is None:
                raise FormatError(
                    f"DCP metadata lists {fqn!r} but says nowhere where it is stored", path=str(folder / METADATA_FILE)
                )
            rel, off, length, desc = _item_file(folder, info, repr(fqn))
            per_file.setdefault(rel, []).append((fqn, c, off, length, desc))
    for rel in per_file:
        if not (folder / rel).is_file():
            raise FormatError(f"DCP folder lacks {rel}, which its metadata names", path=str(folder / rel))
    job = uuid.uuid4().hex[:8]
    parts: list[dict[str, Any]] = []
    values: dict[str, Any] = {}
    try:
        for i, (rel, entries) in enumerate(sorted(per_file.items())):
            path = folder / rel
            leaves: dict[str, Leaf] = {}
            for fqn, c, off, length, desc in entries:
                name = _tensor_name(fqn, paths.get(fqn))
                raw = _untransform(_read_range(path, off, length, repr(fqn)), desc, path)
                if c is None:
                    leaves[sharded.bytes_name(name)] = Leaf("uint8", (len(raw),), np.frombuffer(raw, np.uint8), "torch")
                    plain, value = _plain_value(raw)
                    if plain:
                        values[fqn] = value
                    continue
                t = _load_tensor(raw, path, fqn)
                want = md.state_dict_metadata[fqn]
                assert isinstance(want, TensorStorageMetadata)
                if t.dtype != want.properties.dtype or tuple(t.shape) != tuple(c.sizes):
                    raise FormatError(
                        f"chunk {fqn!r} at {list(c.offsets)} is {t.dtype} {list(t.shape)}, its metadata says "
                        f"{want.properties.dtype} {list(c.sizes)}",
                        path=str(path),
                    )
                leaves[sharded.shard_name(name, c.offsets)] = tensor_to_leaf(t)
            parts.append(store.write_shards(run, step, leaves, base, writer=f"r{i}-{job}"))
            del leaves
        layout, tree = layout_and_tree(md, values)
        extra = {"dcp": {"version": sharded.LAYOUT_VERSION, "items": layout}}
        return store.commit_shards(run, step, parts, tree, metadata, extra=extra)
    except BaseException:
        for part in parts:  # nothing committed: this ingest's packs go (commit_shards frees its own on a race)
            for p in part["packs"]:
                with contextlib.suppress(FileNotFoundError, OSError):
                    store.storage.delete(p)
        raise


def _load_tensor(raw: bytes, path: Path, fqn: str) -> torch.Tensor:
    try:
        t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FormatError(
            f"chunk {fqn!r} does not load with torch.load(weights_only=True): {exc}", path=str(path)
        ) from None
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"chunk {fqn!r} holds a {type(t).__name__}, not a tensor", path=str(path))
    return t


def export_folder(store: Store, ref: str, out: str | os.PathLike[str]) -> Path:
    """Write checkpoint ``ref`` as a DCP folder (``.metadata`` + ``__0_0.distcp``, FileSystemWriter) that plain
    ``dcp.load(state, storage_reader=FileSystemReader(out))`` loads on any number of ranks. Written from this one
    process (no process group) into ``out.partial`` and renamed when complete; ``out`` must not exist."""
    import torch.distributed.checkpoint as dcp

    out = Path(out)
    if out.exists():
        raise OutputPathError(f"{out} already exists", path=str(out), hint="choose a new folder name")
    state = store.load(ref, tensors="torch")
    if not isinstance(state, dict):
        raise InvalidStateError(f"{ref} is not a dict state; DCP saves dicts")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
        tmp.replace(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
