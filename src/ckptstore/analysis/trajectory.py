"""A training trajectory as the analyses read it: an ordered list of checkpoints, tensor by tensor.

Every analysis in :mod:`ckptstore.analysis` reads through a :class:`Trajectory`, so the same code (and the same
numbers) serve a store run, a folder of ``epoch_N.pt`` files and a list of state dicts in memory. Reading is
*name-major*: :meth:`Trajectory.iter_tensor` walks one weight tensor through every checkpoint before the next tensor,
so an analysis holds a few copies of one tensor, not whole checkpoints, whatever the length of the run.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

from ckptstore.errors import CkptStoreError, IntegrityError, InvalidStateError
from ckptstore.format import tree
from ckptstore.format.dtypes import dtype as dtype_of
from ckptstore.format.manifest import Manifest

if TYPE_CHECKING:
    from ckptstore.store import Store

# Where a checkpoint keeps its model weights, in order of preference: open_clip_train and most trainers use
# ``state_dict``, ckptstore.torch.training_state ``model``.
WEIGHT_KEYS = ("state_dict", "model", "model_state_dict", "module")
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
T = TypeVar("T")


class TrajectoryError(CkptStoreError, ValueError):
    """The checkpoints given cannot be read as one trajectory (none, no weights, mismatched tensors)."""


@dataclass(frozen=True)
class Point:
    """One checkpoint of a trajectory: where it sits in training, and its recorded metadata."""

    index: int
    label: str  # a store reference (``run@step``) or a file name
    step: int | None
    epoch: int | None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "step": self.step, "epoch": self.epoch}


@dataclass(frozen=True)
class WeightInfo:
    name: str  # the parameter name (``module.`` stripped)
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def leaf_values(leaf: tree.Leaf) -> np.ndarray:
    """A floating leaf as a read-only numpy float array of its shape (bfloat16 widened exactly to float32)."""
    if leaf.dtype == "bfloat16":
        out = (leaf.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif leaf.dtype in ("float16", "float32", "float64"):
        out = leaf.data.view(np.dtype(dtype_of(leaf.dtype).numpy))
    else:
        raise InvalidStateError(f"not a floating tensor: {leaf.dtype}")
    out = out.reshape(leaf.shape)
    out.flags.writeable = False
    return out


def _weights_node(root: Any) -> Mapping[str, Any]:
    """The sub-dict of a (flattened-tree or loaded) state that holds the model weights."""
    if isinstance(root, Mapping):
        for key in WEIGHT_KEYS:
            node = root.get(key)
            if isinstance(node, Mapping) and node:
                return node
        return root
    raise TrajectoryError(f"a checkpoint's state is a {type(root).__name__}, not a dict of tensors")


class Trajectory:
    """Ordered checkpoints of one run. Subclasses say how to read one weight tensor of one checkpoint."""

    points: list[Point]

    def __init__(self, points: Sequence[Point], weights: Sequence[WeightInfo]) -> None:
        if not points:
            raise TrajectoryError("a trajectory needs at least one checkpoint")
        self.points = list(points)
        self._weights = {w.name: w for w in weights}
        if not self._weights:
            raise TrajectoryError(
                f"{points[0].label} holds no floating-point model weights",
                hint="expected a dict of tensors, or one under 'state_dict' / 'model'",
            )

    def __len__(self) -> int:
        return len(self.points)

    # ------------------------------------------------------------------ what subclasses provide
    def _tensor(self, index: int, name: str) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self, index: int) -> dict[str, Any]:
        """The model weights of one checkpoint as torch tensors, keyed by parameter name (for building a model)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reading
    @property
    def weights(self) -> list[WeightInfo]:
        """The floating-point weight tensors, in the first checkpoint's order."""
        return list(self._weights.values())

    def weight_names(self) -> list[str]:
        return list(self._weights)

    def tensor(self, index: int, name: str) -> np.ndarray:
        """One weight tensor of one checkpoint as a read-only float array."""
        if name not in self._weights:
            raise TrajectoryError(f"no weight tensor {name!r}", hint="Trajectory.weight_names() lists them")
        arr = self._tensor(index, name)
        want = self._weights[name].shape
        if tuple(arr.shape) != want:
            raise TrajectoryError(
                f"{self.points[index].label}: tensor {name!r} has shape {tuple(arr.shape)}, the first checkpoint "
                f"{want}",
                hint="all checkpoints of a trajectory must hold the same model",
            )
        return arr

    def iter_tensor(self, name: str) -> Iterator[np.ndarray]:
        """One weight tensor through every checkpoint, in order."""
        for i in range(len(self.points)):
            yield self.tensor(i, name)


def _weight_infos(named: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[WeightInfo]:
    return [WeightInfo(n, dt, tuple(int(s) for s in shape)) for n, (dt, shape) in named.items() if dt in FLOAT_DTYPES]


# ---------------------------------------------------------------------------------------------- a store run
def _indexed_names(m: Manifest) -> list[str]:
    """The tensor names a compact index (a :meth:`Manifest.subset`) was made of, enough to make it again."""
    return [*m.tensors, *(n for n in m.full_tensors if n not in m.tensors)]


class _Manifests(Sequence[Manifest]):
    """The whole manifests of a trajectory's checkpoints, each parsed on access (through the store's bounded
    manifest cache), none held here."""

    def __init__(self, traj: StoreTrajectory) -> None:
        self._traj = traj

    def __len__(self) -> int:
        return len(self._traj)

    @overload
    def __getitem__(self, index: int) -> Manifest: ...
    @overload
    def __getitem__(self, index: slice) -> list[Manifest]: ...
    def __getitem__(self, index: int | slice) -> Manifest | list[Manifest]:
        if isinstance(index, slice):
            return [self._traj.manifest(i) for i in range(len(self))[index]]
        return self._traj.manifest(index)


class StoreTrajectory(Trajectory):
    """The checkpoints of one store run (or the chosen references of it), read tensor by tensor.

    Walking a tensor through the run in order decodes each delta against the object read just before, so a full
    pass costs about one decode of every weight, and memory stays at a few copies of the tensor being read.

    Per checkpoint it keeps a compact index, not the parsed manifest (one of a CLIP training checkpoint is ~1 MB of
    Python objects, most of it optimizer state and tree that the walks never read; a trajectory of thousands held
    GBs): a :meth:`Manifest.subset` that lists the weight tensors and the objects on their delta chains (records
    shared between checkpoints), and the metadata. Whole manifests come from :meth:`manifest`, through the store's
    bounded manifest cache; an analysis that reads more of every checkpoint than its weights adds that to the index
    once with :meth:`gather` (docs/design.md).
    """

    def __init__(self, store: Store, run: str, refs: Sequence[str] | None = None) -> None:
        self.store = store
        self.run = run
        if refs is None:
            steps = store.steps(run)
            if not steps:
                raise TrajectoryError(f"run {run!r} has no checkpoints", hint="`ckpt ls` lists the runs")
            opened: Iterator[Manifest] = (store.manifest(run, s) for s in steps)
        else:
            opened = (store.resolve(r) for r in refs)
        self._keys: list[tuple[str, int]] = []  # per checkpoint: (run, step), to read its whole manifest again
        self._index: list[Manifest] = []  # per checkpoint: the subset of its manifest that its reads need
        self._names: list[dict[str, str]] = []  # per checkpoint: parameter name -> stored tensor name
        self._gathered: dict[str, list[Any]] = {}
        infos: dict[str, tuple[str, tuple[int, ...]]] = {}
        points = []
        reuse: dict[tuple[str, str], Any] = {}  # records shared by the checkpoints' indexes
        strings: dict[str, str] = {}  # one copy of each name, not one per checkpoint
        for i, m in enumerate(opened):
            node = _weights_node(m.data.get("tree"))
            names: dict[str, str] = {}
            for param, sub in node.items():
                if isinstance(sub, dict) and set(sub) == {"$tensor"}:
                    p, t = str(param).removeprefix("module."), sub["$tensor"]
                    names[strings.setdefault(p, p)] = strings.setdefault(t, t)
            self._names.append(names)
            if i == 0:
                for param, tname in names.items():
                    t = m.full_tensors[tname]
                    infos[param] = (t["dtype"], tuple(t["shape"]))
            self._keys.append((m.run, m.step))
            self._index.append(m.subset(names.values(), reuse=reuse))
            points.append(
                Point(
                    i,
                    m.ref,
                    m.metadata["step"] if isinstance(m.metadata.get("step"), int) else m.step,
                    m.metadata.get("epoch") if isinstance(m.metadata.get("epoch"), int) else None,
                    m.metadata,
                )
            )
        super().__init__(points, _weight_infos(infos))
        self._known: OrderedDict[str, np.ndarray] = OrderedDict()  # recently decoded objects, as delta bases

    def manifest(self, index: int) -> Manifest:
        """The whole manifest of checkpoint ``index``, from the store (its bounded cache, else storage)."""
        return self.store.manifest(*self._keys[index])

    @property
    def manifests(self) -> Sequence[Manifest]:
        """Every checkpoint's whole manifest, parsed on access (:meth:`manifest`); holding them all costs ~1 MB
        each for a CLIP training checkpoint, so read one at a time."""
        return _Manifests(self)

    def tensor_record(self, index: int, name: str) -> dict[str, Any] | None:
        """Checkpoint ``index``'s record (dtype, shape, object) of full tensor ``name``, or None if it has none."""
        rec = self._index[index].full_tensors.get(name)
        return rec if rec is not None else self.manifest(index).full_tensors.get(name)

    def gather(self, key: str, take: Callable[[Manifest], tuple[T, Iterable[str]]]) -> list[T]:
        """``take(manifest)`` of every checkpoint, computed on first use under ``key`` and kept with the
        trajectory: for an analysis that needs a little more of each checkpoint than its weights (the optimizer
        analysis: Adam's state names and param groups). ``take`` returns that value and the stored tensors the
        analysis will read, which join the compact index, so reading them through the run parses no manifest."""
        done = self._gathered.get(key)
        if done is not None:
            return done
        out: list[T] = []
        reuse: dict[tuple[str, str], Any] = {}
        for i in range(len(self)):
            m = self.manifest(i)
            value, more = take(m)
            index = self._index[i]
            extra = [n for n in more if n not in index.tensors and n not in index.full_tensors]
            if extra:
                self._check_same(i, m)
                self._index[i] = m.subset([*_indexed_names(index), *extra], reuse=reuse)
            out.append(value)
        self._gathered[key] = out
        return out

    def read(
        self, index: int, names: Iterable[str], *, known: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, tree.Leaf]:
        """Stored tensors ``names`` of checkpoint ``index`` (names of its full tensors) as ``Store.load_leaves``
        decodes them: from the compact index when it lists them all, else from the whole manifest."""
        wanted = list(names)
        m = self._index[index]
        if not all(n in m.tensors or n in m.full_tensors for n in wanted):
            return self.store.load_leaves(self.manifest(index), wanted, known=known)
        try:
            return self.store.load_leaves(m, wanted, known=known)
        except IntegrityError:
            # Compaction or gc may have replaced the checkpoint's objects and freed the packs the index names.
            # load_leaves' own retry re-reads the manifest but compares its tensors with the index's, which are
            # fewer: read from the whole manifest (load_leaves reads that again if it is stale), then index the
            # new objects. Damage, not a compaction, raises the store's error from there.
            whole = self.manifest(index)
            self._check_same(index, whole)
            try:
                leaves = self.store.load_leaves(whole, wanted, known=known)
            except IntegrityError:
                self._check_same(index, self.manifest(index))  # as load_leaves read it again: changed, or damaged
                raise
            fresh = self.manifest(index)
            self._check_same(index, fresh)
            self._index[index] = fresh.subset(_indexed_names(m))
            return leaves

    def _check_same(self, index: int, whole: Manifest) -> None:
        """``whole`` (the checkpoint's manifest as read now) lists the tensors of its index as they were."""
        for n, t in self._index[index].tensors.items():
            if whole.tensors.get(n) != t:
                raise TrajectoryError(
                    f"{self.points[index].label} changed while this trajectory was open: tensor {n!r} is not "
                    "what it was (the checkpoint was deleted and saved again?)",
                    hint="open the trajectory again",
                )

    def _stored_name(self, index: int, name: str) -> str:
        try:
            return self._names[index][name]
        except KeyError:
            raise TrajectoryError(
                f"{self.points[index].label} has no weight tensor {name!r}",
                hint="all checkpoints of a trajectory must hold the same model",
            ) from None

    def _tensor(self, index: int, name: str) -> np.ndarray:
        tname = self._stored_name(index, name)
        leaf = self.read(index, [tname], known=self._known)[tname]
        oid = self._index[index].full_tensors[tname]["object"]
        self._known[oid] = leaf.data
        self._known.move_to_end(oid)
        while len(self._known) > 1:  # walking in order, a delta's base is the object read just before
            self._known.popitem(last=False)
        return leaf_values(leaf)

    def iter_tensor(self, name: str) -> Iterator[np.ndarray]:
        self._known.clear()
        try:
            yield from super().iter_tensor(name)
        finally:
            self._known.clear()

    def state_dict(self, index: int) -> dict[str, Any]:
        from ckptstore.torch import leaf_to_tensor

        names = self._names[index]
        leaves = self.read(index, list(dict.fromkeys(names.values())))
        return {param: leaf_to_tensor(leaves[t]) for param, t in names.items()}


# ----------------------------------------------------------------------------------------- .pt files on disk
def _file_mappings(path: Path) -> list[tuple[int, int, int]]:
    """``(start, end, file offset)`` of this process's memory mappings of ``path`` (from ``/proc/self/maps``; none
    where that does not exist)."""
    try:
        st = path.stat()
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or int(parts[4]) != st.st_ino:
            continue
        major, _, minor = parts[3].partition(":")
        if (int(major, 16), int(minor, 16)) != (os.major(st.st_dev), os.minor(st.st_dev)):
            continue
        start, _, end = parts[0].partition("-")
        out.append((int(start, 16), int(end, 16), int(parts[2], 16)))
    return out


def _little_endian_file(path: Path) -> bool:
    """True when torch.load leaves a zip-format ``.pt`` file's tensor bytes as they are on disk (no byte swap)."""
    if sys.byteorder != "little":
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/byteorder")]
            return all(z.read(n).strip() == b"little" for n in names)
    except (OSError, zipfile.BadZipFile):
        return False


def _file_offsets(path: Path, state: Mapping[str, Any]) -> dict[str, int]:
    """Where each contiguous tensor of ``state`` (loaded from ``path`` with mmap) starts in the file.

    ``torch.load(mmap=True)`` maps the whole file and points every storage into that mapping, so a tensor's file
    offset is its address less the mapping's start. Tensors outside a mapping of the file (an old-format file read
    whole, a non-contiguous view) get none."""
    maps = _file_mappings(path)
    if not maps or not _little_endian_file(path):
        return {}
    out = {}
    for name, t in state.items():
        if getattr(t, "device", None) is None or t.device.type != "cpu" or not t.is_contiguous():
            continue
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        for start, end, offset in maps:
            if start <= ptr and ptr + nbytes <= end:
                out[name] = ptr - start + offset
                break
    return out


class FileTrajectory(Trajectory):
    """``.pt`` checkpoint files (``epoch_N.pt`` of open_clip_train, or any ``torch.save`` of a state dict).

    Files are opened with ``torch.load(weights_only=True, mmap=True)``, which reads only their pickled structure.
    A weight tensor is then read from the file at its offset into a fresh buffer, not through the mapping: touched
    mapping pages would stay resident (and count in RSS) for as long as the file is open, so a walk through every
    file would end up holding every file's weights. Reading a tensor costs one copy of it, like a store read.
    (Tensors with no known offset, e.g. of an old-format file that torch reads whole, are used as loaded.)
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        from ckptstore.integrations.openclip import checkpoint_metadata

        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise TrajectoryError("no checkpoint files given")
        self._states: list[Mapping[str, Any]] = []
        self._offsets: list[dict[str, int]] = []  # per file: parameter name -> byte offset of its data in the file
        points = []
        infos: dict[str, tuple[str, tuple[int, ...]]] = {}
        from ckptstore.torch import _TORCH_TO_NAME, load_pt

        for i, p in enumerate(self.paths):
            obj = load_pt(str(p), mmap=True)
            node = _weights_node(obj)
            sd = {str(k).removeprefix("module."): v for k, v in node.items() if hasattr(v, "dtype")}
            self._states.append(sd)
            self._offsets.append(_file_offsets(p, sd))
            meta: dict[str, Any] = checkpoint_metadata(obj, p) if isinstance(obj, Mapping) else {}
            epoch = obj.get("epoch") if isinstance(obj, Mapping) and isinstance(obj.get("epoch"), int) else None
            step = meta.get("step") if isinstance(meta.get("step"), int) else None
            points.append(Point(i, p.name, step, epoch, meta))
            if i == 0:
                for k, v in sd.items():
                    if v.dtype in _TORCH_TO_NAME:
                        infos[k] = (_TORCH_TO_NAME[v.dtype], tuple(v.shape))
        super().__init__(points, _weight_infos(infos))

    def _tensor(self, index: int, name: str) -> np.ndarray:
        from ckptstore.torch import _TORCH_TO_NAME, tensor_to_leaf

        t = self._states[index].get(name)
        if t is None:
            raise TrajectoryError(
                f"{self.paths[index]} has no weight tensor {name!r}",
                hint="all checkpoints of a trajectory must hold the same model",
            )
        offset = self._offsets[index].get(name)
        dt = _TORCH_TO_NAME.get(t.dtype)
        if offset is None or dt not in FLOAT_DTYPES:
            return leaf_values(tensor_to_leaf(t))
        size = t.element_size()
        buf = np.empty(t.numel() * size, dtype=np.uint8)
        with open(self.paths[index], "rb") as f:
            f.seek(offset)
            got = f.readinto(buf.data)
        if got != buf.size:
            raise TrajectoryError(f"{self.paths[index]}: short read of tensor {name!r} (the file changed?)")
        return leaf_values(tree.Leaf(dt, tuple(int(s) for s in t.shape), buf.view(f"<u{size}"), "torch"))

    def state_dict(self, index: int) -> dict[str, Any]:
        return dict(self._states[index])


# ------------------------------------------------------------------------------------------- in memory
class MemoryTrajectory(Trajectory):
    """State dicts held in memory (numpy arrays or torch tensors): for tests, notebooks and small models."""

    def __init__(
        self,
        states: Sequence[Mapping[str, Any]],
        *,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if metadata is not None and len(metadata) != len(states):
            raise TrajectoryError(f"{len(states)} states but {len(metadata)} metadata entries")
        self._leaves: list[dict[str, tree.Leaf]] = []
        for s in states:
            node = _weights_node(s)
            leaves = {}
            for k, v in node.items():
                if isinstance(v, np.ndarray):
                    leaves[str(k)] = tree.Leaf.from_numpy(v)
                elif hasattr(v, "dtype") and type(v).__module__.startswith("torch"):
                    from ckptstore.torch import tensor_to_leaf

                    leaves[str(k)] = tensor_to_leaf(v)
            self._leaves.append(leaves)
        metas = list(metadata) if metadata is not None else [{} for _ in states]
        points = [
            Point(
                i,
                labels[i] if labels else f"#{i}",
                m.get("step") if isinstance(m.get("step"), int) else i,
                m.get("epoch") if isinstance(m.get("epoch"), int) else None,
                m,
            )
            for i, m in enumerate(metas)
        ]
        first = self._leaves[0] if self._leaves else {}
        super().__init__(points, _weight_infos({k: (lf.dtype, lf.shape) for k, lf in first.items()}))

    def _tensor(self, index: int, name: str) -> np.ndarray:
        leaf = self._leaves[index].get(name)
        if leaf is None:
            raise TrajectoryError(f"checkpoint {index} has no weight tensor {name!r}")
        return leaf_values(leaf)

    def state_dict(self, index: int) -> dict[str, Any]:
        from ckptstore.torch import leaf_to_tensor

        return {k: leaf_to_tensor(lf) for k, lf in self._leaves[index].items()}


def open_trajectory(source: Any, *, store: Store | None = None, refs: Sequence[str] | None = None) -> Trajectory:
    """A trajectory from a store run name (with ``store``), a folder of ``epoch_N.pt`` files, or a list of files.

    A folder is read like ``ckpt ingest`` reads it: open_clip_train's ``epoch_N.pt`` files in epoch order.
    """
    if isinstance(source, Trajectory):
        return source
    if store is not None and isinstance(source, str) and not Path(source).exists():
        return StoreTrajectory(store, source, refs)
    if isinstance(source, str | Path) and Path(source).is_dir():
        from ckptstore.integrations.openclip import epoch_files

        return FileTrajectory(epoch_files(source))
    if isinstance(source, str | Path):
        return FileTrajectory([source])
    if isinstance(source, Sequence) and all(isinstance(p, str | Path) for p in source):
        return FileTrajectory(list(source))
    raise TrajectoryError(f"cannot read a trajectory from {source!r}", hint="give a store run, a folder or .pt files")
