"""Bit rot (issue 14, item 5): single-bit flips in packs and manifests are found by ``verify``, which names the
checkpoints and tensors affected, and no load ever returns wrong bytes. The full sweep (thousands of trials) is
``benchmarks/bitrot_bench.py``; here a smaller one, and the defect it found, pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ckptstore
from ckptstore.errors import DamagedManifestError, IntegrityError
from ckptstore.format.manifest import CHECKSUM_PREFIX, manifest_bytes, parse_manifest
from ckptstore.testing import bitrot


@pytest.fixture
def rot_store(tmp_path: Path) -> Path:
    path = tmp_path / "s"
    bitrot.build_store(path).close()
    return path


def test_sweep_of_60_flips_finds_every_one(rot_store: Path) -> None:
    before = {p: p.read_bytes() for p in rot_store.rglob("*") if p.is_file()}
    res = bitrot.sweep(rot_store, 60, seed=3, header_share=0.2)
    assert res["failures"] == 0, res["failed_trials"][:3]
    assert res["trials"] == 60 and res["by_where"]["manifest"] > 10 and res["by_where"]["object"] > 10
    assert res["by_where"].get("pack header", 0) > 0
    assert res["detected_by_verify"] == res["damaging"] > 40
    assert res["loads_refused"] >= res["damaging"]
    assert {p: p.read_bytes() for p in rot_store.rglob("*") if p.is_file()} == before  # flipped back
    assert ckptstore.open_store(rot_store).verify()["ok"]


def _one_manifest(path: Path) -> Path:
    return sorted((path / "runs").rglob("*.json"))[-1]


def test_a_flipped_metadata_digit_is_damage_not_a_new_value(rot_store: Path) -> None:
    """Before manifests carried a checksum, this flip (the JSON stays valid) changed the stored loss silently:
    ``verify`` said OK and ``load`` returned the checkpoint."""
    f = _one_manifest(rot_store)
    raw = bytearray(f.read_bytes())
    at = raw.index(b'"last":') + len(b'"last":') + 2  # a digit of the loss value
    raw[at] ^= 0x01
    f.write_bytes(bytes(raw))
    assert json.loads(bytes(raw))["metadata"]["loss"]["last"] != 1.0  # still JSON, a different value
    s = ckptstore.open_store(rot_store)
    res = s.verify()
    ref = next(iter(res["affected"]))
    assert not res["ok"] and res["affected"] == {ref: []} and "does not match its checksum" in res["problems"][0]
    with pytest.raises(DamagedManifestError, match="manifest is damaged") as err:
        s.load(ref)
    assert isinstance(err.value, IntegrityError) and str(f.relative_to(rot_store)) in str(err.value)


def test_a_flipped_tensor_object_names_the_tensors(rot_store: Path) -> None:
    s = ckptstore.open_store(rot_store)
    m = s.manifest("rot", s.steps("rot")[-1])
    name = "model/w1"
    rec = m.objects[m.tensors[name]["object"]]
    pack = rot_store / rec["pack"]
    raw = bytearray(pack.read_bytes())
    raw[int(rec["offset"]) + int(rec["length"]) // 2] ^= 0x10
    pack.write_bytes(bytes(raw))
    s = ckptstore.open_store(rot_store)
    res = s.verify()
    assert res["affected"] == {m.ref: [name]}, res["problems"]
    assert res["problems"] == [p for p in res["problems"] if p.startswith(f"{m.ref}: tensor 'model/w1'")]
    with pytest.raises(IntegrityError):
        s.load(m.ref)
    s.load_tensor(m.ref, "model/w2")  # the rest of the checkpoint still reads


def test_manifest_checksum_format() -> None:
    data = {"kind": "ckptstore.manifest", "format_version": 1, "run": "r", "step": 1}
    raw = manifest_bytes(data)
    assert raw.startswith(CHECKSUM_PREFIX) and json.loads(raw)["run"] == "r"
    assert parse_manifest(raw, "k") == data
    assert parse_manifest(manifest_bytes({**data, "checksum": "stale"}), "k") == data  # never two
    legacy = json.dumps(data).encode()  # a manifest written before the checksum
    assert parse_manifest(legacy, "k") == data
    for i in range(len(CHECKSUM_PREFIX) + 34):  # every bit of the checksum field
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(DamagedManifestError):
                parse_manifest(bytes(bad), "k")
