"""The lossy archive tier: convert chosen checkpoints of a run to error-bounded ``lossy-q`` objects (docs/archive.md).

``archive(store, run, keep)`` keeps the checkpoints a retention policy names (``select:5``; the latest and
pinned ones always) lossless and rewrites every other one: each floating-point tensor of a known kind (model
weights, Adam's ``exp_avg``, ``exp_avg_sq``) is quantised against the *reconstruction* of the same tensor in
the preceding checkpoint (closed loop), within a per-kind bound; everything else stays as it was. The manifest
gets a ``lossy`` record (format §4.6) with the bound and the largest error observed per tensor, which
``verify`` checks; the old lossless objects are then freed like a delete frees them (dependents rebased,
bit-exact). Archiving is explicit and one-way: a lossy checkpoint is never archived again, and a lossless one
is only ever converted by this call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ckptstore import codecs
from ckptstore.codecs.lossy import DEFAULT_BOUNDS, FLOAT_DTYPES, Bound, from_float, quantise, to_float
from ckptstore.errors import InvalidStateError
from ckptstore.format.manifest import Manifest, manifest_bytes, object_id, with_true_depths
from ckptstore.format.pack import PackWriter, new_pack_key
from ckptstore.format.tree import Leaf
from ckptstore.policy import thin
from ckptstore.policy.retention import RetentionPlan
from ckptstore.store import Store

__all__ = [
    "LOSSY_CHAIN",
    "archive",
    "is_lossy",
    "kind_of",
    "lossy_info",
    "parse_bounds",
    "plan_archive",
]

#: Longest chain of lossy objects before one is quantised against zero again (readers refuse 256).
LOSSY_CHAIN = 64


def kind_of(name: str) -> str | None:
    """The tensor kind that decides the bound: ``weights``, ``exp_avg``, ``exp_avg_sq``, or None (kept as is)."""
    if name.startswith(("optimizer", "optim")):
        last = name.rsplit("/", 1)[-1]
        return last if last in ("exp_avg", "exp_avg_sq") else None
    if name.startswith(("state_dict/", "model/", "module/", "model_state_dict/", "params/", "weights/")):
        return "weights"
    return None


def parse_bounds(text: str | Sequence[str] | None) -> dict[str, Bound]:
    """``"weights=rel:1e-3,exp_avg_sq=elem:0.05"`` → bounds per kind, the defaults for the kinds not named."""
    out = dict(DEFAULT_BOUNDS)
    items = [text] if isinstance(text, str) else list(text or [])
    for item in (p.strip() for t in items for p in t.split(",") if p.strip()):
        kind, eq, spec = item.partition("=")
        mode, colon, value = spec.partition(":")
        if not eq or not colon or kind not in DEFAULT_BOUNDS:
            kinds = ", ".join(DEFAULT_BOUNDS)
            raise InvalidStateError(f"bad bound {item!r}", hint=f"KIND=MODE:VALUE, KIND one of {kinds}, "
                                    "MODE abs|rel|elem, e.g. weights=rel:1e-3")  # fmt: skip
        try:
            out[kind] = Bound(mode, float(value))
        except ValueError:
            raise InvalidStateError(f"bad bound value in {item!r}") from None
        if (kind == "exp_avg_sq") != (mode == "elem"):
            raise InvalidStateError(f"bound {item!r}: exp_avg_sq takes elem:V (log domain), the others abs or rel")
    return out


def is_lossy(m: Manifest) -> bool:
    return "lossy" in m.data


def lossy_info(m: Manifest) -> dict[str, Any] | None:
    rec = m.data.get("lossy")
    return rec if isinstance(rec, dict) else None


def plan_archive(store: Store, run: str, keep: str | Sequence[Any]) -> RetentionPlan:
    """Which checkpoints stay lossless (``keep``) and which become lossy (``drop`` of the plan); checkpoints
    already lossy are neither converted again nor counted."""
    return thin.plan_thin(store, run, keep)[0]  # with the weight path when a policy (select) needs it


def archive(
    store: Store,
    run: str,
    keep: str | Sequence[Any],
    *,
    bounds: Mapping[str, Bound] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert every checkpoint of ``run`` that ``keep`` does not keep to the lossy tier; see the module doc."""
    bnd = dict(DEFAULT_BOUNDS if bounds is None else bounds)
    the_plan = plan_archive(store, run, keep)
    todo = sorted(s for s in the_plan.drop if not is_lossy(store.manifest(run, s)))
    converted: list[str] = []
    report: dict[str, Any] = {"run": run, "kept": sorted(the_plan.keep), "bounds": {k: b.as_dict() for k, b in
                              bnd.items()}}  # fmt: skip
    with store._write_lock():
        before = store._stored_bytes()
        doomed: dict[tuple[str, int], int] = {}
        prev_recon: dict[str, np.ndarray] = {}  # name -> reconstruction (float64) of the preceding checkpoint
        prev_m: Manifest | None = None
        steps = store.steps(run)
        for i, s in enumerate(steps):
            m = store.manifest(run, s)
            if s in todo:
                m = _convert(store, m, prev_m, prev_recon, bnd, doomed)
                converted.append(m.ref)
            else:
                prev_recon = {}  # a lossless checkpoint: the next lossy one quantises against its exact values
            prev_m = m
            if progress is not None:
                progress(i + 1, len(steps))
        rewritten, removed = store._free_locations({run: doomed}, None)
        after = store._stored_bytes()
    report.update(converted=converted, rewritten=rewritten, removed_packs=removed, freed_bytes=before - after,
                  store_bytes_before=before, store_bytes_after=after)  # fmt: skip
    return report


def _convert(
    store: Store,
    m: Manifest,
    prev_m: Manifest | None,
    prev_recon: dict[str, np.ndarray],
    bounds: Mapping[str, Bound],
    doomed: dict[tuple[str, int], int],
) -> Manifest:
    if "dcp" in m.data:
        raise InvalidStateError(f"{m.ref} is a sharded (DCP) checkpoint; archiving it is not supported", ref=m.ref)
    names = [n for n, t in m.tensors.items() if kind_of(n) and t["dtype"] in FLOAT_DTYPES]
    leaves = store.load_leaves(m, names)
    pack_key = new_pack_key(m.run, m.step)
    bytes_codec = codecs.bytes_codec(store.codec, store.level)
    tensors = {n: dict(t) for n, t in m.tensors.items()}
    new_records: dict[str, dict[str, Any]] = {}
    per_tensor: dict[str, dict[str, Any]] = {}
    with PackWriter(store.storage, pack_key) as writer:
        for n in names:
            leaf = leaves[n]
            kind = kind_of(n)
            assert kind is not None
            flat = leaf.words if leaf.dtype == "bfloat16" else leaf.to_numpy().reshape(-1)
            ref_oid = None
            ref_vals = None
            if prev_m is not None and n in prev_m.tensors and prev_m.tensors[n]["shape"] == m.tensors[n]["shape"] \
                    and prev_m.tensors[n]["dtype"] == leaf.dtype:  # fmt: skip
                ref_oid = str(prev_m.tensors[n]["object"])
                if int(prev_m.objects[ref_oid].get("depth", 0)) >= LOSSY_CHAIN:
                    ref_oid = None
                else:
                    ref_vals = prev_recon.get(n)
                    if ref_vals is None:
                        words = store.load_leaves(prev_m, [n])[n]
                        ref_vals = to_float(words.words if leaf.dtype == "bfloat16" else words.to_numpy().reshape(-1),
                                            leaf.dtype)  # fmt: skip
            domain = "log" if kind == "exp_avg_sq" else "linear"
            codec, qwords, recon, rec = quantise(flat, leaf.dtype, bounds[kind], domain=domain, ref=ref_vals)
            prev_recon[n] = recon
            out_words = from_float(recon, leaf.dtype)
            out_leaf = Leaf(leaf.dtype, leaf.shape, out_words if leaf.dtype == "bfloat16" else out_words.view(
                leaf.data.dtype))  # fmt: skip
            oid = object_id(out_leaf)
            tensors[n]["object"] = oid
            per_tensor[n] = {"kind": kind, **{k: rec[k] for k in ("bound", "eps", "max_err", "exceptions")}}
            if oid in new_records or (prev_m is not None and oid in prev_m.objects):
                continue  # nothing moved: the same reconstruction as before
            spec = codecs.TensorSpec(leaf.dtype, leaf.shape)
            side = codec.side_bytes()
            body = bytes_codec.encode(qwords, spec)
            parts = [struct.pack("<Q", len(side)) + side, body]
            r: dict[str, Any] = {"dtype": leaf.dtype, "shape": list(leaf.shape),
                                 "codecs": [codec.record(), bytes_codec.record_for([body])], "depth": 0}  # fmt: skip
            if ref_oid is not None:
                r["refs"] = {"prev": ref_oid}
            r["pack"] = pack_key
            r["offset"], r["length"] = writer.append(parts)
            new_records[oid] = r
        stored = writer.tell
        writer.commit()
    table: dict[str, dict[str, Any]] = {}
    pending = [t["object"] for t in tensors.values()]
    while pending:
        o = pending.pop()
        if o in table:
            continue
        rec2 = new_records.get(o) or m.objects.get(o) or (prev_m.objects.get(o) if prev_m is not None else None)
        if rec2 is None:
            raise InvalidStateError(f"object {o} lost while archiving", ref=m.ref)
        table[o] = rec2
        pending.extend(rec2.get("refs", {}).values())
    for o in set(m.objects) - set(table):
        doomed.setdefault((m.objects[o]["pack"], int(m.objects[o]["offset"])), m.step)
    data = dict(m.data)
    data.update(tensors=tensors, objects=with_true_depths(table))
    data["packs"] = [*(p for p in data.get("packs", []) if any(r["pack"] == p for r in table.values())), pack_key]
    stats = dict(data.get("stats", {}))
    stats["stored_bytes"] = int(stats.get("stored_bytes", 0)) + stored
    data["stats"] = stats
    data["lossy"] = {"codec": "lossy-q", "bounds": {k: b.as_dict() for k, b in bounds.items()},
                     "tensors": per_tensor}  # fmt: skip
    store.storage.write(m.key, manifest_bytes(data))
    new = Manifest(data, m.key)
    store._manifests[(m.run, m.step)] = new
    return new
