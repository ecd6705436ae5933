"""Parts of a checkpoint that can be dropped on their own (format §4.5): today the optimizer state.

A *part* is a set of top-level entries of the state tree. Dropping a part removes those entries from the
skeleton, their tensors from ``tensors`` and what only they needed from ``objects``, and appends a record to the
manifest's ``dropped`` list, so every reader can tell a weights-only checkpoint from a full one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptstore.errors import InvalidStateError
from ckptstore.format import tree

__all__ = ["PARTS", "dropped_parts", "lossy_problems", "part_keys", "strip_tree"]

#: Part name → the top-level keys of the state that hold it (open_clip_train and ``ckptstore.torch``:
#: ``optimizer``; Lightning: ``optimizer_states``; others).
PARTS: dict[str, tuple[str, ...]] = {
    "optimizer": ("optimizer", "optimizer_states", "optimizer_state_dict", "optim", "opt_state"),
}


def part_keys(skeleton: Any, part: str) -> list[str]:
    """The top-level keys of ``skeleton`` that hold ``part`` (empty when it has none, or was dropped)."""
    if part not in PARTS:
        raise InvalidStateError(f"unknown checkpoint part {part!r}", hint=f"known parts: {', '.join(PARTS)}")
    if not isinstance(skeleton, dict) or any(k.startswith("$") for k in skeleton):
        return []  # the state is not a dict keyed by strings: nothing to drop by name
    return [k for k in skeleton if k in PARTS[part]]


def strip_tree(skeleton: Any, keys: Sequence[str]) -> tuple[Any, list[str]]:
    """The skeleton without the top-level ``keys``, and the names of the tensors that went with them."""
    gone = [n for k in keys for n in tree.tensor_names(skeleton[k])]
    return {k: v for k, v in skeleton.items() if k not in keys}, gone


def dropped_parts(data: Mapping[str, Any]) -> list[str]:
    """The parts a manifest says were dropped (``[]`` for a complete checkpoint)."""
    recs = data.get("dropped") or []
    return [str(r.get("part")) for r in recs if isinstance(r, Mapping)]


def lossy_problems(data: Mapping[str, Any]) -> list[str]:
    """A lossy manifest's record checked against itself (format §4.6): every tensor it names must exist and
    have a recorded max error within its recorded bound (``eps``, or the ``elem`` value)."""
    info = data.get("lossy")
    if info is None:
        return []
    if not isinstance(info, Mapping) or not isinstance(info.get("tensors"), Mapping):
        return ["the lossy record is malformed"]
    out = []
    tensors = data.get("tensors") or {}
    for n, rec in info["tensors"].items():
        b = rec.get("bound") or {} if isinstance(rec, Mapping) else {}
        limit = b.get("value") if b.get("mode") == "elem" else rec.get("eps")
        err = rec.get("max_err")
        if n not in tensors:
            out.append(f"{n}: in the lossy record but not a tensor")
        elif not isinstance(limit, int | float) or not isinstance(err, int | float) or not err <= limit:
            out.append(f"{n}: recorded max error {err} is not within its bound {limit}")
    return out
