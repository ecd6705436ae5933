"""Bit-rot sweep: flip single random bits in a local store's packs and manifests and check what the store does.

For every trial one bit of one file flips (a manifest, or a pack: anywhere in it, header and dead space included),
then a fresh :class:`~ckptstore.store.Store` runs ``verify`` and loads every checkpoint, and the bit flips back.
A trial passes when

* ``verify`` reports every checkpoint the flip damaged (``affected``; for a flip inside an object: every tensor
  whose delta chain runs through that object, by name), and nothing else;
* every load returns the original bytes or raises one of the library's own errors: a damaged checkpoint is never
  returned with wrong bytes, and nothing else (a raw ``ValueError``, a crash) escapes.

``benchmarks/bitrot_bench.py`` runs it with thousands of trials; ``tests/test_bitrot.py`` with a few dozen.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptstore.errors import CkptStoreError
from ckptstore.format.spec import PACK_HEADER_SIZE
from ckptstore.store import Store, create_store, open_store

__all__ = ["Trial", "build_store", "sweep"]


def _state(rng: np.random.Generator, step: int, prev: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """A small training-like state: float32 weights drifting by ~1e-3, Adam-like moments, a bf16 copy (raw
    uint16 words), an int64 counter table, scalars."""
    if prev is None:
        w = {
            "w1": rng.standard_normal((48, 64), dtype=np.float32),
            "w2": rng.standard_normal((64,), dtype=np.float32),
            "emb": rng.standard_normal((96, 32), dtype=np.float32),
        }
    else:
        w = {k: (v * np.float32(0.999) + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3))
             for k, v in prev.items()}  # fmt: skip
    moments = {f"{k}.exp_avg_sq": (v * v * np.float32(1e-2)).astype(np.float32) for k, v in w.items()}
    return {
        "model": dict(w),
        "optimizer": moments,
        "bf16": (w["w1"].view(np.uint32) >> np.uint32(16)).astype(np.uint16),
        "counts": np.arange(step, step + 40, dtype=np.int64),
        "step": step,
    }


def build_store(path: Path, *, checkpoints: int = 6, seed: int = 0, run: str = "rot") -> Store:
    """A local store of ``checkpoints`` consecutive states (delta chains, a keyframe, shared objects); then the
    second checkpoint is deleted (a rebase) and ``gc`` run, so the layout is what a used store looks like."""
    rng = np.random.default_rng(seed)
    store = create_store(path)
    prev: dict[str, np.ndarray] | None = None
    for i in range(checkpoints):
        state = _state(rng, (i + 1) * 100, prev)
        prev = state["model"]
        store.save(run, (i + 1) * 100, state, {"epoch": i + 1, "loss": {"last": 1.0 / (i + 1)}})
    if checkpoints >= 3:
        store.delete([f"{run}@200"])
        store.gc()
    return store


@dataclass
class Trial:
    """One flipped bit and what the store did about it."""

    file: str
    offset: int
    bit: int
    where: str  # "manifest", "object", "pack header", "dead space"
    expected: dict[str, list[str]]  # checkpoint -> damaged tensors ([] for a whole checkpoint)
    reported: dict[str, list[str]]
    load_errors: dict[str, str]  # checkpoint -> the error its load raised
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _flat_bytes(store: Store, ref: str) -> dict[str, bytes]:
    return {n: np.ascontiguousarray(lf.data).tobytes() for n, lf in store.load_leaves(store.resolve(ref)).items()}


Spans = dict[str, list[tuple[int, int, str]]]


def _layout(store: Store) -> tuple[Spans, dict[str, dict[str, set[str]]], dict[str, str]]:
    """Each pack's object spans ``(offset, end, object)``; per object, the checkpoints and tensors whose chains
    read it; each manifest file's checkpoint."""
    spans: Spans = {}
    readers: dict[str, dict[str, set[str]]] = {}
    manifests: dict[str, str] = {}
    for run in store.runs():
        for step in store.steps(run):
            m = store.manifest(run, step)
            ref = f"{run}@{step}"
            manifests[m.key] = ref
            for o, rec in m.objects.items():
                start = int(rec["offset"])
                spans.setdefault(rec["pack"], []).append((start, start + int(rec["length"]), o))
            for name, t in m.tensors.items():
                for o in m.chain(t["object"]):
                    readers.setdefault(o, {}).setdefault(ref, set()).add(name)
    return spans, readers, manifests


def sweep(
    path: Path,
    trials: int,
    *,
    seed: int = 0,
    manifest_share: float = 0.5,
    header_share: float = 0.05,
    on_trial: Callable[[int, Trial], None] | None = None,
) -> dict[str, Any]:
    """Run ``trials`` single-bit flips on the local store at ``path`` (left as it was found). Returns the
    figures: trials by where the bit was (``header_share`` of the pack trials aim at a pack's 16-byte header,
    which uniform offsets would almost never hit), failures (with their trials), verify and load times."""
    rng = random.Random(seed)
    pristine = open_store(path)
    spans, readers, manifests = _layout(pristine)
    refs = sorted({r for m in readers.values() for r in m} | set(manifests.values()))
    truth = {ref: _flat_bytes(pristine, ref) for ref in refs}
    pristine.close()
    packs = sorted(spans)
    root = Path(path)
    out: list[Trial] = []
    t_verify = t_load = 0.0
    for i in range(trials):
        kind = "manifest" if rng.random() < manifest_share else "pack"
        key = rng.choice(sorted(manifests)) if kind == "manifest" else rng.choice(packs)
        f = root / key
        raw = bytearray(f.read_bytes())
        aim = PACK_HEADER_SIZE if kind == "pack" and rng.random() < header_share else len(raw)
        offset, bit = rng.randrange(aim), rng.randrange(8)
        expected: dict[str, list[str]] = {}
        if kind == "manifest":
            where = "manifest"
            expected[manifests[key]] = []
        elif offset < PACK_HEADER_SIZE:
            where = "pack header"
            for _a, _b, o in spans[key]:
                for ref in readers.get(o, {}):
                    expected.setdefault(ref, [])
        else:
            hit = [o for a, b, o in spans[key] if a <= offset < b]
            where = "object" if hit else "dead space"
            for o in hit:
                for ref, names in readers.get(o, {}).items():
                    expected[ref] = sorted(set(expected.get(ref, [])).union(names))
        raw[offset] ^= 1 << bit
        f.write_bytes(bytes(raw))
        trial = Trial(key, offset, bit, where, expected, {}, {})
        try:
            store = open_store(path)
            t0 = time.perf_counter()
            try:
                res = store.verify()
                trial.reported = {k: sorted(set(v)) for k, v in res["affected"].items()}
                if res["ok"] != (not res["problems"]):
                    trial.failures.append("verify: ok disagrees with problems")
            except Exception as exc:  # the sweep's point: anything but a report is a finding
                trial.failures.append(f"verify raised {type(exc).__name__}: {exc}")
            t1 = time.perf_counter()
            for ref in refs:
                try:
                    got = _flat_bytes(store, ref)
                except CkptStoreError as exc:
                    trial.load_errors[ref] = f"{type(exc).__name__}: {exc}"
                    continue
                except Exception as exc:
                    trial.failures.append(f"load {ref} raised {type(exc).__name__}: {exc}")
                    continue
                if got != truth[ref]:
                    bad = sorted(n for n in set(got) | set(truth[ref]) if got.get(n) != truth[ref].get(n))
                    trial.failures.append(f"load {ref} returned wrong bytes or names: {bad[:5]}")
            t_load += time.perf_counter() - t1
            if where == "object" and not trial.reported and not trial.load_errors and not trial.failures:
                trial.where = "object, no effect"  # the flipped bit changes nothing that is decoded
            else:
                missed = {r: [n for n in ns if n not in trial.reported.get(r, [])] for r, ns in expected.items()}
                for r, gone in missed.items():
                    if r not in trial.reported:
                        trial.failures.append(f"verify missed damaged checkpoint {r}")
                    elif gone and trial.reported[r] != []:
                        trial.failures.append(f"verify missed damaged tensors of {r}: {gone}")
                for r in trial.reported:
                    if r not in expected:
                        trial.failures.append(f"verify reported {r}, which the flip did not touch")
            t_verify += t1 - t0
            store.close()
        finally:
            raw[offset] ^= 1 << bit
            f.write_bytes(bytes(raw))
        out.append(trial)
        if on_trial is not None:
            on_trial(i, trial)
    by_where: dict[str, int] = {}
    for t in out:
        by_where[t.where] = by_where.get(t.where, 0) + 1
    failed = [t for t in out if not t.ok]
    return {
        "trials": len(out),
        "by_where": by_where,
        "detected_by_verify": sum(1 for t in out if t.expected and set(t.expected) <= set(t.reported)),
        "damaging": sum(1 for t in out if t.expected),
        "loads_refused": sum(len(t.load_errors) for t in out),
        "failures": len(failed),
        "failed_trials": [
            {"file": t.file, "offset": t.offset, "bit": t.bit, "where": t.where, "failures": t.failures} for t in failed
        ],
        "verify_s_per_trial": t_verify / max(1, len(out)),
        "load_s_per_trial": t_load / max(1, len(out)),
    }
