"""Hostile manifests: structural mutations of valid manifests, re-checksummed so the checksum does not stop them
(a forged store, not bit rot), then listed, loaded and verified. Anything but the library's own errors is a finding,
as is a case slower than ``slow`` seconds (a hang) or a ``MemoryError`` (an allocation from a forged length; run
under an address-space limit: ``benchmarks/fuzz_manifests.py`` sets one).
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Any

from ckptstore.errors import CkptStoreError
from ckptstore.format.manifest import manifest_bytes, parse_manifest
from ckptstore.store import open_store

__all__ = ["fuzz_manifests", "mutate"]

ODD_VALUES: list[Any] = [None, True, False, -1, 0, 1, 2**31, 2**63, 2**70, -(2**63), 1.5, -0.0, 1e308, "", "x",
                         "float32", "bogus", "xxh128:" + "0" * 32, "packs/../x.pack", "packs/x.pack", [], [-1],
                         [2**40, 2**40], [0] * 70, {}, {"$tensor": "nope"}, {"name": "delta"}]  # fmt: skip


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*path, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def mutate(doc: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """One structural mutation of a manifest document, and what it was."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _nodes(doc) if p]
    path = rng.choice(paths)
    parent, key = _get(doc, path[:-1]), path[-1]
    op = rng.choice(["replace", "replace", "delete", "swap", "grow"])
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "swap":
        other = rng.choice(paths)
        try:
            parent[key] = copy.deepcopy(_get(doc, other))
        except (KeyError, IndexError, TypeError):
            op = "replace"
            parent[key] = rng.choice(ODD_VALUES)
    elif op == "grow" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * rng.choice([-1, 2, 1000, 2**40]) + rng.choice([-1, 0, 1])
    else:
        op = "replace"
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return doc, f"{op} {'/'.join(map(str, path))}"


def fuzz_manifests(path: Path, cases: int, *, seed: int = 0, slow: float = 10.0) -> dict[str, Any]:
    """``cases`` mutations of the manifests of the local store at ``path`` (restored after each)."""
    rng = random.Random(seed)
    files = sorted((path / "runs").rglob("*.json"))
    originals = {f: f.read_bytes() for f in files}
    docs = {f: parse_manifest(raw, str(f)) for f, raw in originals.items()}
    findings: dict[str, dict[str, Any]] = {}
    refused = accepted = 0
    worst = 0.0
    for _ in range(cases):
        f = rng.choice(files)
        doc, what = mutate(docs[f], rng)
        try:
            raw = manifest_bytes(doc)
        except (TypeError, ValueError):
            continue
        f.write_bytes(raw)
        t0 = time.perf_counter()
        try:
            st = open_store(path)
            try:
                st.checkpoints()
                for run in st.runs():
                    for step in st.steps(run):
                        try:
                            st.load(f"{run}@{step}")
                        except CkptStoreError:
                            refused += 1
                res = st.verify()
                accepted += res["ok"]
            finally:
                st.close()
        except CkptStoreError:
            refused += 1
        except Exception as exc:  # the point of the fuzzer: anything else is a finding
            kind = f"{type(exc).__name__} from {what.split()[0]} {_shape(what)}"
            findings.setdefault(kind, {"count": 0, "example": f"{what}: {type(exc).__name__}: {exc}"[:300]})
            findings[kind]["count"] += 1
        took = time.perf_counter() - t0
        worst = max(worst, took)
        if took > slow:
            findings.setdefault("slow", {"count": 0, "example": f"{what}: {took:.1f} s"})["count"] += 1
        f.write_bytes(originals[f])
    return {
        "cases": cases,
        "refused_loads": refused,
        "verify_ok_after_mutation": accepted,
        "findings": sum(v["count"] for v in findings.values()),
        "finding_kinds": findings,
        "slowest_case_s": round(worst, 3),
    }


def _shape(what: str) -> str:
    """The mutated path with ids and indices blanked, to group findings."""
    parts = what.split(" ", 1)[1].split("/")
    return "/".join("*" if (p.isdigit() or p.startswith("xxh128:") or "." in p) else p for p in parts)
