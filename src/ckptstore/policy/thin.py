"""Policies meet the store: a run's history (with weight paths), thinning plans, applying them, pinning.

This is the only policy module that reads a store; the decisions themselves stay in the pure modules. Reading
goes through ``Store.checkpoints`` (metadata) and ``Store.load_leaves`` (the weight tensors, only when a policy
needs the weight path); deleting goes through ``Store.delete``, which re-encodes the survivors that were deltas
against deleted checkpoints first, so every kept checkpoint stays bit-exact.

**Weight path.** ``trajectory.path_length`` in a checkpoint's metadata is the cumulative L2 distance the model
weights travelled from the run's first checkpoint, summed checkpoint to checkpoint (``trajectory.distance`` is the
last hop, from ``trajectory.prev_step``). ``ckpt watch`` and the recorder write it when they save; otherwise it
is computed here by decoding the weight tensors, and ``thin`` records it on the checkpoints it keeps before it
deletes anything — so a thinned run still knows how far its weights moved between the checkpoints it kept, and
selection on it gives the same answer as before (the guarantee behind idempotent thinning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ckptstore.format.manifest import Manifest
from ckptstore.format.tree import Leaf
from ckptstore.metadata import edit_tags
from ckptstore.policy.history import PATH_KEY, PIN_TAG, Entry, entries_from_infos
from ckptstore.policy.retention import RetentionPlan, RetentionPolicy, parse_retention, plan, plan_tiers
from ckptstore.store import Store

__all__ = [
    "WEIGHT_PREFIXES",
    "PathTracker",
    "apply_plan",
    "compute_paths",
    "history",
    "pin",
    "plan_thin",
    "weight_names",
    "weight_prefix",
]

#: Where checkpoints keep their model weights, tried in order: open_clip_train and Lightning (``state_dict``),
#: ``ckptstore.torch.training_state`` and the transformers integration (``model``), others.
WEIGHT_PREFIXES = ("state_dict/", "model/", "module/", "model_state_dict/", "params/", "weights/")
_NOT_WEIGHTS = ("optimizer", "optimizer_states/", "lr_schedulers/", "scheduler/", "scaler/", "rng/", "extra/")
_CHUNK = 1 << 20


def _is_float(dtype: str) -> bool:
    return dtype in ("float64", "float32", "float16", "bfloat16")


def weight_prefix(names_dtypes: Mapping[str, str]) -> str:
    """The weight prefix of a checkpoint (``""``: every floating tensor outside optimizer/RNG state)."""
    for p in WEIGHT_PREFIXES:
        if any(n.startswith(p) and _is_float(d) for n, d in names_dtypes.items()):
            return p
    return ""


def weight_names(names_dtypes: Mapping[str, str], prefix: str | None = None) -> tuple[str, list[str]]:
    """``(prefix, names)`` of the floating-point weight tensors."""
    p = weight_prefix(names_dtypes) if prefix is None else prefix
    names = [
        n for n, d in names_dtypes.items()
        if n.startswith(p) and _is_float(d) and (p or not n.startswith(_NOT_WEIGHTS))
    ]  # fmt: skip
    return p, names


def _dtypes_of(m: Manifest) -> dict[str, str]:
    return {n: t["dtype"] for n, t in m.full_tensors.items()}


def as_float(leaf: Leaf) -> np.ndarray | None:
    """A floating-point leaf's values as a flat float32/float64 array (bfloat16 widened exactly)."""
    if leaf.dtype == "bfloat16":
        return (leaf.words.astype(np.uint32) << 16).view(np.float32)
    if leaf.dtype in ("float64", "float32", "float16"):
        return leaf.to_numpy().reshape(-1)
    return None


def _sq_distance(a: np.ndarray, b: np.ndarray) -> float:
    total = 0.0
    for i in range(0, a.size, _CHUNK):
        d = a[i : i + _CHUNK].astype(np.float64) - b[i : i + _CHUNK].astype(np.float64)
        d = d[np.isfinite(d)]
        total += float(np.dot(d, d))
    return total


def distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """L2 distance between two sets of weights (tensors present in both with the same size)."""
    total = 0.0
    for n, x in a.items():
        y = b.get(n)
        if y is not None and y.size == x.size:
            total += _sq_distance(x, y)
    return float(np.sqrt(total))


def _load_weights(store: Store, m: Manifest, prefix: str | None) -> tuple[str, dict[str, np.ndarray]]:
    p, names = weight_names(_dtypes_of(m), prefix)
    out = {}
    for n, leaf in store.load_leaves(m, names).items():
        arr = as_float(leaf)
        if arr is not None:
            out[n] = arr
    return p, out


def _recorded(m: Manifest) -> float | None:
    rec = m.metadata.get(PATH_KEY)
    val = rec.get("path_length") if isinstance(rec, Mapping) else None
    return float(val) if isinstance(val, int | float) and not isinstance(val, bool) else None


def compute_paths(
    store: Store,
    run: str,
    *,
    prefix: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """The weight-path record of every checkpoint of ``run``: recorded values where present, the rest computed by
    decoding the weights of consecutive checkpoints. Each record: ``path_length``, ``prev_step``, ``distance``,
    ``weights`` (the tensor prefix) and ``recorded`` (False when computed now)."""
    steps = store.steps(run)
    out: dict[int, dict[str, Any]] = {}
    prev_weights: dict[str, np.ndarray] | None = None
    prev_m: Manifest | None = None
    for i, s in enumerate(steps):
        m = store.manifest(run, s)
        rec_val = _recorded(m)
        if rec_val is not None:
            rec = dict(m.metadata[PATH_KEY])
            rec["recorded"] = True
            out[s] = rec
            prev_weights = None  # decoded lazily if a later checkpoint needs it
        elif prev_m is None:
            p, _names = weight_names(_dtypes_of(m), prefix)
            out[s] = {"path_length": 0.0, "prev_step": None, "distance": 0.0, "weights": p, "recorded": False}
        else:
            if prev_weights is None:
                _p, prev_weights = _load_weights(store, prev_m, prefix)
            p, cur = _load_weights(store, m, prefix)
            unchanged = {
                n for n in cur
                if n in prev_m.full_tensors and prev_m.full_tensors[n]["object"] == m.full_tensors[n]["object"]
            }  # fmt: skip
            d = distance({n: v for n, v in cur.items() if n not in unchanged}, prev_weights)
            base = float(out[prev_m.step]["path_length"])
            out[s] = {"path_length": base + d, "prev_step": prev_m.step, "distance": d, "weights": p,
                      "recorded": False}  # fmt: skip
            prev_weights = cur
        if rec_val is not None and i + 1 < len(steps) and _recorded(store.manifest(run, steps[i + 1])) is None:
            _p, prev_weights = _load_weights(store, m, prefix)
        prev_m = m
        if progress is not None:
            progress(i + 1, len(steps))
    return out


def history(
    store: Store,
    run: str,
    *,
    paths: bool = False,
    prefix: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Entry]:
    """A run's entries (step order); with ``paths``, ``Entry.path`` filled in (recorded or computed)."""
    entries = entries_from_infos(store.checkpoints(run))
    if not paths or not entries:
        return entries
    recs = compute_paths(store, run, prefix=prefix, progress=progress)
    return [_with_path(e, recs.get(e.step, {}).get("path_length")) for e in entries]


def _with_path(e: Entry, path: float | None) -> Entry:
    return Entry(e.step, e.epoch, e.metrics, e.tags, e.pinned, e.stored_bytes, path, e.time, e.reason)


def plan_thin(
    store: Store,
    run: str,
    policies: str | RetentionPolicy | Sequence[Any],
    *,
    keep_weights: str | RetentionPolicy | Sequence[Any] | None = None,
    prefix: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[RetentionPlan, dict[int, dict[str, Any]]]:
    """The retention plan for ``run`` and the weight-path records it used (empty when no policy needs them).

    With ``keep_weights`` (same grammar, e.g. ``"all"``), what only those policies keep stays weights-only: its
    optimizer state is dropped (``RetentionPlan.weights_only``, format §4.5)."""
    pols = parse_retention(policies)
    slim = parse_retention(keep_weights) if keep_weights is not None else []
    entries = entries_from_infos(store.checkpoints(run))
    recs: dict[int, dict[str, Any]] = {}
    if any(p.needs_paths for p in [*pols, *slim]) and entries:
        recs = compute_paths(store, run, prefix=prefix, progress=progress)
        entries = [_with_path(e, recs[e.step]["path_length"]) for e in entries]
    if keep_weights is not None:
        return plan_tiers(entries, pols, slim), recs
    return plan(entries, pols), recs


def record_paths(store: Store, run: str, recs: Mapping[int, Mapping[str, Any]], steps: Sequence[int]) -> int:
    """Write computed weight-path records into the metadata of ``steps`` (those not recorded yet)."""
    n = 0
    for s in steps:
        rec = recs.get(s)
        if rec is None or rec.get("recorded"):
            continue
        value = {k: v for k, v in rec.items() if k != "recorded"}

        def put(md: dict[str, Any], value: dict[str, Any] = value) -> None:
            md[PATH_KEY] = value

        store.update_metadata(f"{run}@{s}", put)
        n += 1
    return n


def apply_plan(
    store: Store,
    run: str,
    the_plan: RetentionPlan,
    recs: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Delete what ``the_plan`` drops and drop the optimizer state of its ``weights_only`` checkpoints (after
    recording weight paths on what it keeps). Returns the store's report (``deleted``, ``rewritten``,
    ``freed_bytes`` ...) plus ``weights_only`` (the checkpoints slimmed now) and ``recorded_paths``."""
    kept = [e.step for e in the_plan.kept]
    recorded = record_paths(store, run, recs or {}, kept)
    out: dict[str, Any] = {"deleted": [], "rewritten": 0, "freed_bytes": 0, "removed_packs": 0,
                           "weights_only": [], "recorded_paths": recorded}  # fmt: skip
    if the_plan.drop:
        res = store.delete([f"{run}@{s}" for s in sorted(the_plan.drop)], progress=progress)
        out.update(res)
    slim = [s for s in sorted(the_plan.weights_only) if "optimizer" not in _dropped(store, run, s)]
    if slim:
        res = store.drop_parts([f"{run}@{s}" for s in slim], ["optimizer"], reason="thin --keep-weights",
                               progress=progress)  # fmt: skip
        out["weights_only"] = res["changed"]
        out["rewritten"] += res["rewritten"]
        out["freed_bytes"] += res["freed_bytes"]
        out["removed_packs"] += res["removed_packs"]
    return out


def _dropped(store: Store, run: str, step: int) -> list[str]:
    return store.manifest(run, step).info().dropped


def pin(store: Store, ref: str, pinned: bool = True) -> Manifest:
    """Pin (or unpin) a checkpoint: the ``pinned`` tag, which every retention plan respects."""

    def edit(md: dict[str, Any]) -> None:
        edit_tags(md, remove=[PIN_TAG])
        edit_tags(md, add=[PIN_TAG] if pinned else [])  # (re)pinned: the pin tag goes last
        if not pinned:
            md.pop("pinned", None)

    return store.update_metadata(ref, edit)


class PathTracker:
    """Weight-path records for checkpoints as they are saved (``ckpt watch``, the recorder): remembers the last
    saved weights on the host and measures each new checkpoint against them, so no decoding is needed later.

    Use :meth:`measure` before the save (its record goes into the metadata) and :meth:`commit` once it is stored.
    """

    def __init__(self, store: Store, run: str, *, prefix: str | None = None) -> None:
        self.store = store
        self.run = run
        self.prefix = prefix
        self._prev: tuple[int, float, dict[str, np.ndarray]] | None = None

    def _from_store(self, before: int) -> tuple[int, float, dict[str, np.ndarray]] | None:
        earlier = [s for s in self.store.steps(self.run) if s < before]
        if not earlier:
            return None
        m = self.store.manifest(self.run, earlier[-1])
        path = _recorded(m)
        if path is None:
            path = float(compute_paths(self.store, self.run, prefix=self.prefix)[m.step]["path_length"])
        _p, weights = _load_weights(self.store, m, self.prefix)
        return m.step, path, weights

    def measure(self, step: int, leaves: Mapping[str, Leaf]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The record for a checkpoint at ``step`` holding ``leaves`` (and the weights to pass to commit)."""
        p, names = weight_names({n: lf.dtype for n, lf in leaves.items()}, self.prefix)
        weights: dict[str, np.ndarray] = {}
        for n in names:
            arr = as_float(leaves[n])
            if arr is not None:
                weights[n] = np.array(arr, copy=True)  # the live tensor may change after this call
        prev = self._prev if self._prev is not None and self._prev[0] < step else self._from_store(step)
        if prev is None:
            return {"path_length": 0.0, "prev_step": None, "distance": 0.0, "weights": p}, weights
        d = distance(weights, prev[2])
        return {"path_length": prev[1] + d, "prev_step": prev[0], "distance": d, "weights": p}, weights

    def commit(self, step: int, record: Mapping[str, Any], weights: dict[str, np.ndarray]) -> None:
        self._prev = (step, float(record["path_length"]), weights)
