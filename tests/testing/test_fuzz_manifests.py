"""Hostile manifests (issue 14, item 3, manifests only): structurally mutated, re-checksummed manifests give only
the library's own errors. The long run is ``benchmarks/fuzz_manifests.py``; the findings it made are pinned here."""

from __future__ import annotations

from pathlib import Path

import pytest

import ckptstore
from ckptstore.errors import FormatError
from ckptstore.format.manifest import manifest_bytes, parse_manifest
from ckptstore.testing import bitrot, fuzz


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "s"
    bitrot.build_store(path).close()
    return path


def test_300_mutations_give_only_library_errors(store_path: Path) -> None:
    res = fuzz.fuzz_manifests(store_path, 300, seed=5)
    assert res["findings"] == 0, res["finding_kinds"]
    assert res["refused_loads"] > 100


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("objects", 0, "offset"), 2**70),  # was OverflowError from the read
        (("objects", 0, "shape"), [2**40, 2**40]),  # was ValueError from numpy
        (("tensors", 0, "shape"), None),  # was TypeError
        (("objects", 0, "refs"), "prev"),  # was AttributeError
        (("tensors", 0, "object"), "xxh128:" + "0" * 32),  # was KeyError
        (("format_version",), []),  # was TypeError
        (("tree",), {"w": {"$tuple": 5}}),  # was TypeError from the skeleton walk
    ],
)
def test_pinned_findings_are_format_errors(store_path: Path, path: tuple[object, ...], value: object) -> None:
    f = sorted((store_path / "runs").rglob("*.json"))[-1]
    doc = parse_manifest(f.read_bytes(), str(f))
    node = doc
    for p in path[:-1]:
        node = node[list(node)[p]] if isinstance(p, int) else node[p]
    node[path[-1]] = value
    f.write_bytes(manifest_bytes(doc))
    s = ckptstore.open_store(store_path)
    ref = f"{doc['run']}@{doc['step']}"
    with pytest.raises(FormatError):
        s.load(ref)
    res = s.verify()
    assert not res["ok"] and ref in res["affected"]


@pytest.mark.parametrize("checksummed", [False, True])
def test_a_manifest_nested_thousands_deep_is_damaged_not_a_recursion_error(checksummed: bool) -> None:
    """json's RecursionError on a document nested 100,000 deep escaped parse_manifest (with or without a valid
    checksum in front of it, a forged manifest is read the same way)."""
    body = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    import xxhash

    from ckptstore.format.manifest import CHECKSUM_PREFIX

    digest = xxhash.xxh3_128(body).hexdigest().encode()  # as manifest_bytes writes it (json.dumps cannot nest so deep)
    raw = CHECKSUM_PREFIX + digest + b'",' + body[1:] if checksummed else body
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_manifest(raw, "runs/r/ckpt/1.json")
