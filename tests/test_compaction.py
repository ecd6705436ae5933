"""The hot layout and compaction (docs/format.md §4.7): a save writes changed tensors raw, so the newest checkpoint
reads one object per tensor; compaction re-encodes the older ones exactly as a dense save would have."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.errors import InvalidStateError


def _states(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A small training run: a matrix that moves a little each step, a frozen table, a counter, a fp16 vector."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 96)) * 0.1).astype(np.float32)
    frozen = rng.standard_normal(3000).astype(np.float32)
    h = rng.standard_normal(500).astype(np.float16)
    out = []
    for i in range(n):
        w = w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
        h = h.copy()
        h[rng.integers(0, h.size, 20)] += np.float16(0.01)
        out.append(
            {"model": {"w": w.copy(), "frozen": frozen.copy(), "h": h}, "step": np.int64(i), "lr": 0.1 / (i + 1)}
        )
    return out


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k in ("w", "frozen", "h"):
        assert got["model"][k].dtype == want["model"][k].dtype
        assert got["model"][k].tobytes() == want["model"][k].tobytes(), k
    assert got["step"] == want["step"] and got["lr"] == want["lr"]


def _one_object_per_tensor(store: ckptstore.Store, run: str, step: int) -> bool:
    m = store.manifest(run, step)
    return all(len(m.chain(t["object"])) == 1 for t in m.tensors.values())


def test_hot_saves_compact_to_exactly_what_dense_saves_write(tmp_path: Path) -> None:
    states = _states(9)
    dense = ckptstore.create_store(tmp_path / "dense", keyframe_interval=3)
    hot = ckptstore.create_store(tmp_path / "hot", keyframe_interval=3, layout="hot", compaction="manual")
    assert json.loads((tmp_path / "hot" / "ckptstore.json").read_text())["settings"]["layout"] == "hot"
    for i, st in enumerate(states):
        dense.save("r", i, st)
        hot.save("r", i, st)
        assert hot.manifest("r", i).data["layout"] == "hot"
        assert all(not r.get("refs") for r in hot.manifest("r", i).objects.values())  # one object each
    for i, st in enumerate(states):  # before compaction
        _assert_same(hot.load(f"r@{i}"), st)
    res = hot.compact("r")
    assert res["compacted"] == [f"r@{i}" for i in range(8)] and res["logical_bytes"] > 0
    assert res["bytes_per_second"] > 0 and res["freed_bytes"] > 0
    assert [hot.manifest("r", i).data.get("layout") for i in range(9)] == [None] * 8 + ["hot"]
    assert _one_object_per_tensor(hot, "r", 8)
    for i in range(8):  # the same codecs, chains and payload sizes as the dense store's
        hm, dm = hot.manifest("r", i), dense.manifest("r", i)
        assert hm.tensors == dm.tensors
        strip = lambda objs: {o: (r["codecs"], r.get("refs"), r["depth"], r["length"]) for o, r in objs.items()}  # noqa: E731
        assert strip(hm.objects) == strip(dm.objects), i
    fresh = ckptstore.open_store(tmp_path / "hot")
    for i, st in enumerate(states):  # after compaction, from a fresh Store
        _assert_same(fresh.load(f"r@{i}"), st)
    assert fresh.verify()["ok"]
    # a finished run: the newest too, then the store is byte for byte as large as the dense one
    fresh.compact("r", newest=True)
    assert fresh.manifest("r", 8).data.get("layout") is None
    assert fresh.stats("r")["pack_bytes"] == dense.stats("r")["pack_bytes"]
    _assert_same(ckptstore.open_store(tmp_path / "hot").load("r@latest"), states[-1])


def test_background_compaction_keeps_latest_one_object_per_tensor(tmp_path: Path) -> None:
    states = _states(7, seed=1)
    with ckptstore.create_store(tmp_path / "s", keyframe_interval=4, layout="hot") as store:
        assert store.compaction == "background"
        for i, st in enumerate(states):
            store.save("r", i, st)
            assert _one_object_per_tensor(store, "r", i)  # @latest after any save
            _assert_same(store.load("r@latest"), st)  # while the compactor may be working on the one before
        store.wait_compaction()
        assert [store.manifest("r", i).data.get("layout") for i in range(7)] == [None] * 6 + ["hot"]
    store = ckptstore.open_store(tmp_path / "s")
    for i, st in enumerate(states):
        _assert_same(store.load(f"r@{i}"), st)
    for i, (_, got) in enumerate(store.iter_load("r")):
        _assert_same(got, states[i])
    assert store.verify()["ok"]
    live = {rec["pack"] for s in store.steps("r") for rec in store.manifest("r", s).objects.values()}
    assert set(store.storage.list("packs")) == live  # the compactor's gc freed the raw packs


def test_an_unchanged_tensor_stays_one_object_after_its_predecessor_compacts(tmp_path: Path) -> None:
    """``frozen`` never changes: compaction makes it a keyframe of step 0, its later copies the same record; a hot
    save after that must not take a delta record from the predecessor."""
    states = _states(6, seed=2)
    store = ckptstore.create_store(tmp_path / "s", keyframe_interval=2, layout="hot", compaction="manual")
    for i, st in enumerate(states):
        store.save("r", i, st)
        store.compact("r")
        assert _one_object_per_tensor(store, "r", i)
    fresh = ckptstore.open_store(tmp_path / "s")
    for i, st in enumerate(states):
        _assert_same(fresh.load(f"r@{i}"), st)


def test_a_reader_with_the_old_manifest_retries_with_the_new_one(tmp_path: Path) -> None:
    states = _states(4, seed=3)
    writer = ckptstore.create_store(tmp_path / "s", layout="hot", compaction="manual")
    for i, st in enumerate(states):
        writer.save("r", i, st)
    reader = ckptstore.open_store(tmp_path / "s")
    old = reader.manifest("r", 1)  # hot: raw objects in step 1's pack
    writer.compact("r")  # re-encodes step 1, then gc deletes its raw pack
    assert not writer.storage.exists(old.objects[old.tensors["model/w"]["object"]]["pack"])
    leaves = reader.load_leaves(old)  # the old manifest's packs are gone: read again, decoded from the new ones
    assert leaves["model/w"].data.tobytes() == states[1]["model"]["w"].tobytes()


def test_a_dense_store_opened_hot_and_back(tmp_path: Path) -> None:
    states = _states(6, seed=4)
    store = ckptstore.create_store(tmp_path / "s", keyframe_interval=3)
    assert store.layout == "dense" and store.compaction == "manual"
    for i in range(3):
        store.save("r", i, states[i])
    assert store.compact("r")["compacted"] == []  # nothing hot
    hot = ckptstore.open_store(tmp_path / "s", layout="hot", compaction="manual")  # this process only
    for i in range(3, 5):
        hot.save("r", i, states[i])
        assert _one_object_per_tensor(hot, "r", i)
    assert hot.compact("r")["compacted"] == ["r@3"]
    again = ckptstore.open_store(tmp_path / "s")  # dense again: deltas against the hot newest
    again.save("r", 5, states[5])
    assert again.manifest("r", 5).data.get("layout") is None
    assert again.compact("r")["compacted"] == ["r@4"]  # no longer the newest; step 5 keeps its own records
    for i, st in enumerate(states):
        _assert_same(again.load(f"r@{i}"), st)
    assert again.verify()["ok"]


def test_delete_and_thin_keep_hot_checkpoints_one_object(tmp_path: Path) -> None:
    states = _states(6, seed=5)
    store = ckptstore.create_store(tmp_path / "s", keyframe_interval=3, layout="hot", compaction="manual")
    for i in range(5):
        st = {**states[i], "optimizer": {"m": states[i]["model"]["w"] * 2}}
        store.save("r", i, st)
    store.compact("r")
    store.save("r", 5, states[5])  # reuses step 4's raw records? no: step 4 is hot, they are one object each
    store.delete(["r@4", "r@2"])  # step 5's unchanged tensors pointed into step 4's pack
    assert _one_object_per_tensor(store, "r", 5)
    store.drop_parts(["r@3"])
    fresh = ckptstore.open_store(tmp_path / "s")
    for i in (0, 1, 3, 5):
        _assert_same(fresh.load(f"r@{i}"), states[i])
    assert fresh.verify()["ok"]


def test_bad_layout_and_compaction_settings(tmp_path: Path) -> None:
    with pytest.raises(InvalidStateError, match="layout"):
        ckptstore.create_store(tmp_path / "a", layout="warm")
    assert not (tmp_path / "a" / "ckptstore.json").exists()
    ckptstore.create_store(tmp_path / "b")
    with pytest.raises(InvalidStateError, match="layout"):
        ckptstore.open_store(tmp_path / "b", layout="warm")
    with pytest.raises(InvalidStateError, match="compaction"):
        ckptstore.open_store(tmp_path / "b", compaction="sometimes")


def test_background_failure_is_raised_by_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ckptstore.create_store(tmp_path / "s", layout="hot")

    def boom(*_: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(store, "_compact_encode", boom)
    states = _states(2, seed=6)
    store.save("r", 0, states[0])
    store.save("r", 1, states[1])  # the background pass fails; the save itself succeeded
    with pytest.raises(OSError, match="disk on fire"):
        store.close()
    fresh = ckptstore.open_store(tmp_path / "s", compaction="manual")
    for i in range(2):
        _assert_same(fresh.load(f"r@{i}"), states[i])
    assert fresh.compact("r")["compacted"] == ["r@0"]


def test_a_hot_save_codes_mostly_zero_tensors_and_writes_the_rest_raw(tmp_path: Path) -> None:
    """AdamW moments of never-seen token rows are mostly zeros: a hot save codes such a tensor as a keyframe (one
    object, fast to decode); a dense-valued tensor is written raw."""
    z = np.zeros(100_000, np.float32)
    z[::97] = 1.5
    r = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    store = ckptstore.create_store(tmp_path / "s", layout="hot", compaction="manual")
    store.save("r", 0, {"z": z, "r": r})
    m = store.manifest("r", 0)
    rec = {n: m.objects[t["object"]] for n, t in m.tensors.items()}
    assert rec["z"]["codecs"] and not rec["z"].get("refs") and rec["z"]["length"] < z.nbytes // 10
    assert rec["r"]["codecs"] == [] and rec["r"]["length"] == r.nbytes
    got = ckptstore.open_store(tmp_path / "s").load("r@0")
    assert got["z"].tobytes() == z.tobytes() and got["r"].tobytes() == r.tobytes()


def test_a_checkpoint_changed_during_its_compaction_is_compacted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding runs outside the write lock; the commit checks the manifest is unchanged, else drops the pack and
    tries again (here a metadata edit by another Store lands while step 0 is being encoded)."""
    states = _states(3, seed=7)
    store = ckptstore.create_store(tmp_path / "s", layout="hot", compaction="manual")
    for i, st in enumerate(states):
        store.save("r", i, st, {"epoch": i})
    other = ckptstore.open_store(tmp_path / "s")
    real = store._compact_encode
    packs: list[str | None] = []

    def encode_then_edit(m: Any, p: Any) -> Any:
        out = real(m, p)
        packs.append(out[1])
        if len(packs) == 1:
            other.update_metadata("r@0", lambda md: md.update(notes="edited meanwhile"))
        return out

    monkeypatch.setattr(store, "_compact_encode", encode_then_edit)
    res = store.compact("r")
    assert res["compacted"] == ["r@0", "r@1"] and len(packs) == 3  # step 0 encoded twice
    assert packs[0] is not None and not store.storage.exists(packs[0])  # the first attempt's pack was dropped
    fresh = ckptstore.open_store(tmp_path / "s")
    assert fresh.manifest("r", 0).metadata["notes"] == "edited meanwhile"  # the edit survived
    for i, st in enumerate(states):
        _assert_same(fresh.load(f"r@{i}"), st)
    assert fresh.verify()["ok"]
