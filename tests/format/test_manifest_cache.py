"""ManifestCache: most recently used manifests kept up to a record budget, the metadata of every one seen kept."""

from __future__ import annotations

from ckptstore.format.manifest import Manifest, ManifestCache


def manifest(step: int, tensors: int, meta: dict | None = None) -> Manifest:
    objects = {f"o{step}-{i}": {"dtype": "float32", "shape": [2], "pack": "p", "offset": 0, "length": 8, "codecs": []}
               for i in range(tensors)}  # fmt: skip
    data = {
        "kind": "ckptstore.manifest",
        "format_version": 1,
        "run": "r",
        "step": step,
        "tree": {},
        "tensors": {f"t{i}": {"dtype": "float32", "shape": [2], "object": o} for i, o in enumerate(objects)},
        "objects": objects,
        "metadata": meta or {"epoch": step},
    }
    return Manifest(data, f"runs/r/ckpt/{step}.json")


def test_evicts_least_recently_used_past_the_record_budget_and_keeps_metadata() -> None:
    cache = ManifestCache(max_records=3 * 21)  # three manifests of 10 tensors + 10 objects (+1 each)
    for s in range(3):
        cache[("r", s)] = manifest(s, 10)
    assert len(cache) == 3 and cache.records == 63
    assert cache.get(("r", 0)) is not None  # now the most recently used
    cache[("r", 3)] = manifest(3, 10)
    assert cache.get(("r", 1)) is None, "the least recently used goes first"
    assert [cache.get(("r", s)) is not None for s in (0, 2, 3)] == [True, True, True]
    assert cache.records <= cache.max_records
    # an evicted manifest is still known, with its metadata
    assert ("r", 1) in cache and cache.metadata(("r", 1)) == {"epoch": 1}
    assert ("r", 9) not in cache and cache.metadata(("r", 9)) is None


def test_replacing_pop_and_clear_keep_the_books_right() -> None:
    cache = ManifestCache(max_records=1000)
    cache[("r", 1)] = manifest(1, 10)
    cache[("r", 1)] = manifest(1, 4, {"tags": ["x"]})  # e.g. update_metadata: the new one replaces the old
    assert cache.records == 9 and cache.metadata(("r", 1)) == {"tags": ["x"]}
    assert cache.pop(("r", 1)) is not None
    assert ("r", 1) not in cache and cache.records == 0 and cache.pop(("r", 1)) is None
    cache[("r", 2)] = manifest(2, 3)
    cache.clear()
    assert len(cache) == 0 and cache.records == 0 and ("r", 2) not in cache


def test_one_manifest_larger_than_the_budget_is_still_kept() -> None:
    cache = ManifestCache(max_records=5)
    cache[("r", 1)] = manifest(1, 10)
    assert cache.get(("r", 1)) is not None  # the one in use is never dropped
    cache[("r", 2)] = manifest(2, 10)
    assert cache.get(("r", 1)) is None and cache.get(("r", 2)) is not None
