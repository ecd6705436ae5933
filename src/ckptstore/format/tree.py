"""The state tree: a nested checkpoint state split into a JSON skeleton plus named tensors — never pickle.

A state is any nesting of dicts, lists and tuples whose leaves are tensors or plain values. Tensors become
``{"$tensor": "<name>"}`` in the skeleton, where the name is the path of keys joined by ``/``
(``optimizer/state/0/exp_avg``). Values JSON cannot hold are tagged: ``{"$tuple": [...]}``,
``{"$dict": [[key, value], ...]}`` for dicts with non-string keys (optimizer state is keyed by int),
``{"$float": "nan"}``, ``{"$bytes": "<base64>"}``, ``{"$scalar": ["float32", <value>]}`` for numpy scalars.
Anything else is refused with the path where it was found.
"""

from __future__ import annotations

import base64
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptstore.errors import CkptStoreError, FormatError, InvalidNameError, InvalidStateError
from ckptstore.format import dtypes
from ckptstore.format.names import check_component
from ckptstore.format.spec import MAX_NDIM

TAGS = ("$tensor", "$tuple", "$dict", "$float", "$bytes", "$scalar")


@dataclass
class Leaf:
    """A tensor as the store sees it: dtype name, shape, and its bytes as a flat C-ordered numpy array."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # 1-D, contiguous, itemsize == dtype's itemsize (or uint8 for empty/odd cases)
    framework: str = "numpy"  # where it came from, so a load can hand back the same kind of tensor

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def words(self) -> np.ndarray:
        return dtypes.words(self.data, dtypes.dtype(self.dtype))

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Leaf:
        name = dtypes.name_of_numpy(array.dtype)
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        return cls(name, tuple(int(s) for s in array.shape), data.reshape(-1))

    def to_numpy(self) -> np.ndarray:
        """Values as a numpy array; bfloat16/float8 (which numpy lacks) come back as raw unsigned words."""
        dt = dtypes.dtype(self.dtype)
        if dt.numpy:
            return self.data.view(np.dtype(dt.numpy)).reshape(self.shape)
        return self.words.reshape(self.shape)


LeafConverter = Callable[[Any], "Leaf | None"]


# Adapters for other frameworks' tensors, by the top-level module of the value's type: the adapter module and its
# converter function. Filled lazily (fsspec's ``known_implementations``): the adapter is imported only when a value
# of that framework is met, so the format layer never imports an adapter (nor torch) itself.
LEAF_ADAPTERS: dict[str, tuple[str, str]] = {"torch": ("ckptstore.torch", "tensor_to_leaf")}


_CONVERTERS: dict[tuple[str, str], Callable[[Any], Leaf]] = {}  # adapters already imported (a save meets hundreds)


def foreign_leaf(value: Any) -> Leaf | None:
    """Tensors of other frameworks, converted without importing those frameworks unless they are in use."""
    adapter = LEAF_ADAPTERS.get(type(value).__module__.partition(".")[0])
    if adapter is not None and hasattr(value, "dtype") and hasattr(value, "shape"):
        convert = _CONVERTERS.get(adapter)
        if convert is None:
            module, func = adapter
            convert = _CONVERTERS[adapter] = getattr(importlib.import_module(module), func)
        return convert(value)
    return None


def flatten(state: Any, *, foreign: LeafConverter = foreign_leaf) -> tuple[Any, dict[str, Leaf]]:
    """Split a state into its JSON skeleton and its tensors by name. ``foreign`` turns another framework's tensor
    into a leaf (None: not a tensor); an async save passes one that copies into snapshot buffers."""
    tensors: dict[str, Leaf] = {}

    def at(path: list[str]) -> str:  # for messages only: a save walks hundreds of nodes that never need it
        return "/".join(path) or "<root>"

    def walk(value: Any, path: list[str]) -> Any:
        if isinstance(value, np.ndarray):
            try:
                converted_array = Leaf.from_numpy(value)
            except FormatError:
                raise InvalidStateError(
                    f"cannot store a numpy array of dtype {value.dtype} at {at(path)}",
                    hint="store numeric or bool arrays; convert strings/objects to JSON values",
                ) from None
            return leaf(converted_array, path)
        if isinstance(value, np.generic):
            if isinstance(value, np.bool_ | np.integer | np.floating):
                item = value.item()
                if isinstance(item, float) and not math.isfinite(item):
                    item = {"$float": repr(item)}
                return {"$scalar": [dtypes.name_of_numpy(value.dtype), item]}
            raise InvalidStateError(f"unsupported numpy scalar {type(value).__name__} at {at(path)}")
        if isinstance(value, Leaf):  # a leaf built by the caller (bfloat16 words, an average cast back)
            return leaf(value, path)
        converted = foreign(value)
        if converted is not None:
            return leaf(converted, path)
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, bytes | bytearray):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, dict):
            keys = list(value.keys())
            if all(isinstance(k, str) and not k.startswith("$") for k in keys):
                return {k: walk(v, [*path, _component(k, path)]) for k, v in value.items()}
            items = []
            seen: set[str] = set()
            for k, v in value.items():
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise InvalidStateError(
                        f"dict key {k!r} of type {type(k).__name__} at {at(path)}",
                        hint="state dict keys must be str or int",
                    )
                comp = _component(str(k), path)
                if comp in seen:
                    raise InvalidStateError(f"keys {k!r} and {str(k)!r} collide at {at(path)}")
                seen.add(comp)
                items.append([k, walk(v, [*path, comp])])
            return {"$dict": items}
        if isinstance(value, list | tuple):
            items = [walk(v, [*path, str(i)]) for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"$tuple": items}
        raise InvalidStateError(
            f"cannot store a value of type {type(value).__module__}.{type(value).__name__} at {at(path)}",
            hint="states hold tensors, numbers, strings, bools, None, bytes, and dicts/lists/tuples of them",
        )

    def leaf(value: Leaf, path: list[str]) -> dict[str, str]:
        if not path:
            raise InvalidStateError("the state itself is a tensor", hint="wrap it in a dict: {'tensor': t}")
        if len(value.shape) > MAX_NDIM:
            raise InvalidStateError(f"tensor {'/'.join(path)} has more than {MAX_NDIM} dimensions")
        name = "/".join(path)
        tensors[name] = value
        return {"$tensor": name}

    try:
        skeleton = walk(state, [])
    finally:
        # walk calls itself through its closure: a reference cycle that would keep ``tensors`` (every tensor of
        # the state) alive until the collector's next full pass; emptying the cell breaks it
        walk = None  # type: ignore[assignment]
    return skeleton, tensors


def _component(key: str, path: list[str]) -> str:
    try:
        return check_component(key)
    except InvalidNameError:  # again, for the message that names the whole path (built only when it is needed)
        try:
            check_component(key, full="/".join([*path, key]))
        except InvalidNameError as exc:
            raise InvalidNameError(exc.message, hint=exc.hint) from None
        raise


def tensor_names(skeleton: Any) -> Iterator[str]:
    """Tensor names in the order they appear in the skeleton."""
    if isinstance(skeleton, dict):
        if "$tensor" in skeleton and len(skeleton) == 1:
            yield skeleton["$tensor"]
            return
        if "$dict" in skeleton and len(skeleton) == 1:
            for _, v in skeleton["$dict"]:
                yield from tensor_names(v)
            return
        if "$tuple" in skeleton and len(skeleton) == 1:
            for v in skeleton["$tuple"]:
                yield from tensor_names(v)
            return
        for v in skeleton.values():
            yield from tensor_names(v)
    elif isinstance(skeleton, list):
        for v in skeleton:
            yield from tensor_names(v)


def unflatten(skeleton: Any, get_tensor: Callable[[str], Any]) -> Any:
    """Rebuild the state; ``get_tensor(name)`` supplies each tensor in the caller's framework."""
    try:
        return _walk(skeleton, get_tensor)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        if isinstance(exc, CkptStoreError):
            raise
        raise FormatError(f"malformed state skeleton: {type(exc).__name__}: {exc}") from None


def _walk(node: Any, get_tensor: Callable[[str], Any]) -> Any:
    # (a module function, not a closure: a nested function that calls itself is a reference cycle, which kept
    # ``get_tensor`` and with it every decoded tensor of a load alive until the collector's next full pass)
    if isinstance(node, dict):
        if len(node) == 1:
            ((tag, val),) = node.items()
            if tag == "$tensor":
                return get_tensor(val)
            if tag == "$tuple":
                return tuple(_walk(v, get_tensor) for v in val)
            if tag == "$dict":
                return {k: _walk(v, get_tensor) for k, v in val}
            if tag == "$float":
                return float(val)
            if tag == "$bytes":
                return base64.b64decode(val)
            if tag == "$scalar":
                dt, item = val
                if isinstance(item, dict):
                    item = float(item["$float"])
                return np.array(item, dtype=np.dtype(dtypes.dtype(dt).numpy))[()]
        if any(k.startswith("$") for k in node):
            raise FormatError(f"unknown tag in state skeleton: {sorted(node)[:3]}")
        return {k: _walk(v, get_tensor) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, get_tensor) for v in node]
    return node
