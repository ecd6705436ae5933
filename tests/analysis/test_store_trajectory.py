"""StoreTrajectory's memory: per checkpoint it keeps the weight tensors and the objects of their delta chains, not
the parsed manifest (whose optimizer state and tree the walks never read), and reads stay bit-exact, through a
compaction that replaces the objects under it as well."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.analysis.trajectory import StoreTrajectory, TrajectoryError
from ckptstore.format.manifest import Manifest, parse_manifest

PARAMS = {"enc.weight": (24, 16), "enc.bias": (24,), "dec.weight": (8, 24), "dec.bias": (8,)}


def _states(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` checkpoints of a small model trained with Adam: weights (float32, one float16, an integer buffer)
    and per parameter ``exp_avg``, ``exp_avg_sq`` and ``step``, as torch's Adam state dict has them."""
    rng = np.random.default_rng(seed)
    w = {k: rng.standard_normal(s).astype(np.float32) for k, s in PARAMS.items()}
    m1 = {k: np.zeros(s, np.float32) for k, s in PARAMS.items()}
    m2 = {k: np.zeros(s, np.float32) for k, s in PARAMS.items()}
    out = []
    for step in range(1, n + 1):
        for k in PARAMS:
            g = rng.standard_normal(PARAMS[k]).astype(np.float32)
            m1[k] = (0.9 * m1[k] + 0.1 * g).astype(np.float32)
            m2[k] = (0.999 * m2[k] + 0.001 * g * g).astype(np.float32)
            w[k] = (w[k] - 1e-2 * m1[k] / (np.sqrt(m2[k]) + 1e-8)).astype(np.float32)
        model = {k: v.copy() for k, v in w.items()}
        model["dec.bias"] = model["dec.bias"].astype(np.float16)
        model["count"] = np.array([step], dtype=np.int64)
        out.append(
            {
                "model": model,
                "optimizer": {
                    "state": {
                        i: {
                            "step": np.array(float(step), np.float32),
                            "exp_avg": m1[k].copy(),
                            "exp_avg_sq": m2[k].copy(),
                        }
                        for i, k in enumerate(PARAMS)
                    },
                    "param_groups": [
                        {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "params": list(range(len(PARAMS)))}
                    ],
                },
                "epoch": step,
            }
        )
    return out


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("traj") / "s"
    states = _states(12)
    with ckptstore.create_store(path, keyframe_interval=4) as store:
        for i, st in enumerate(states, 1):
            store.save("r", i, st, {"epoch": i})
    return path, states


def _manifest_reads(store: ckptstore.Store) -> list[str]:
    """Every manifest the store reads from storage from now on (recorded in the list returned)."""
    reads: list[str] = []
    read = store.storage.read

    def counting(key: str, *a: Any, **kw: Any) -> Any:
        if key.endswith(".json") and "/ckpt/" in key:
            reads.append(key)
        return read(key, *a, **kw)

    store.storage.read = counting  # type: ignore[method-assign]
    return reads


def test_each_checkpoint_keeps_only_its_weights_and_their_chains(adam_run: tuple[Path, Any]) -> None:
    path, states = adam_run
    store = ckptstore.open_store(path)
    traj = StoreTrajectory(store, "r")
    weights = {f"model/{k}" for k in (*PARAMS, "count")}
    assert [w.name for w in traj.weights] == list(PARAMS)  # the integer buffer is read, not analysed
    deltas = 0
    for i in range(len(traj)):
        kept, whole = traj._index[i], store.manifest("r", i + 1)
        assert len(whole.tensors) == 5 + 3 * len(PARAMS)  # the optimizer state is most of the checkpoint
        assert set(kept.tensors) == weights
        assert all(kept.tensors[n] == whole.tensors[n] for n in weights)
        chains = {o for n in weights for o in whole.chain(whole.tensors[n]["object"])}
        assert set(kept.objects) == chains and len(chains) < len(whole.objects)
        assert all(kept.objects[o] == whole.objects[o] for o in chains)
        assert kept.data["tree"] == {}
        assert kept.metadata == whole.metadata == traj.points[i].metadata
        deltas += sum(len(whole.chain(whole.tensors[n]["object"])) > 1 for n in weights)
    assert deltas > 0  # the run has delta chains, so the chains above are more than one object
    # consecutive checkpoints share the records of the objects their chains have in common
    a, b = traj._index[1], traj._index[2]
    common = set(a.objects) & set(b.objects)
    assert common and all(a.objects[o] is b.objects[o] for o in common)
    # a subset is a manifest of its own: the store reads its tensors from it
    leaves = store.load_leaves(traj._index[5], ["model/enc.weight"])
    assert leaves["model/enc.weight"].data.tobytes() == states[5]["model"]["enc.weight"].tobytes()


def test_an_open_trajectory_holds_a_fraction_of_its_manifests(adam_run: tuple[Path, Any]) -> None:
    path, _ = adam_run
    raw = ckptstore.open_store(path).storage.read(ckptstore.open_store(path).manifest("r", 12).key)
    gc.collect()
    tracemalloc.start()
    try:
        parsed = Manifest(parse_manifest(bytes(raw), "k"), "k")
        one, _ = tracemalloc.get_traced_memory()
        del parsed
        store = ckptstore.open_store(path)
        store._manifests.max_records = 1  # the store's cache keeps one manifest: what is left is the trajectory's
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        traj = StoreTrajectory(store, "r")
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(traj) == 12
    # 12 whole manifests would be ~12 x one (measured: 0.99 x, before this index); the weights are under a third of
    # the tensors and the chains share records (measured: 0.23 x)
    assert held < 0.4 * len(traj) * one, (held, one)


def test_walks_and_state_dicts_are_bit_exact_and_parse_no_manifest(adam_run: tuple[Path, Any]) -> None:
    torch = pytest.importorskip("torch")
    path, states = adam_run
    store = ckptstore.open_store(path)
    store._manifests.max_records = 1
    traj = StoreTrajectory(store, "r")
    reads = _manifest_reads(store)
    for name in traj.weight_names():
        got = list(traj.iter_tensor(name))
        assert len(got) == len(states)
        for i, x in enumerate(got):
            want = store.load(f"r@{i + 1}", tensors="numpy")["model"][name]
            assert x.dtype == want.dtype and x.shape == want.shape
            assert np.array_equal(x.view(np.uint8), want.view(np.uint8)), (name, i)
            assert x.tobytes() == states[i]["model"][name].tobytes()
    del reads[:]  # store.load above read whole manifests; the walks themselves read none
    for name in traj.weight_names():
        for _ in traj.iter_tensor(name):
            pass
    assert reads == []
    for i in (0, 5, 11):
        sd = traj.state_dict(i)
        assert list(sd) == [*PARAMS, "count"]
        for k, t in sd.items():
            want = states[i]["model"][k]
            assert isinstance(t, torch.Tensor) and t.numpy().dtype == want.dtype
            assert t.numpy().tobytes() == want.tobytes(), (i, k)
    assert reads == []


def test_the_optimizer_analysis_reads_each_manifest_once_and_gives_the_same_report(
    adam_run: tuple[Path, Any],
) -> None:
    pytest.importorskip("torch")
    from ckptstore.analysis.optimizer import analyze_optimizer

    path, _ = adam_run
    held = StoreTrajectory(ckptstore.open_store(path), "r")  # every manifest stays in the store's cache
    want = analyze_optimizer(held).to_dict()
    store = ckptstore.open_store(path)
    store._manifests.max_records = 1
    traj = StoreTrajectory(store, "r")
    reads = _manifest_reads(store)
    got = analyze_optimizer(traj).to_dict()
    assert got == want
    assert got["tensors"]["enc.weight"]["eff_step"]["mean"][3] is not None  # Adam's state was read
    # the layout (one manifest) and one pass gathering Adam's state names, not a pass per tensor
    assert len(reads) <= len(traj) + 2, len(reads)
    kept = traj._index[4]
    assert {n.rsplit("/", 1)[-1] for n in kept.tensors} == {*PARAMS, "count", "step", "exp_avg_sq"}
    assert not any(n.endswith("/exp_avg") for n in kept.tensors)


@pytest.mark.parametrize("cached", [True, False])
def test_reads_after_a_compaction_replaced_the_objects(tmp_path: Path, cached: bool) -> None:
    """A compaction by another process re-encodes the hot checkpoints and frees the packs a trajectory's index
    names: the trajectory reads the new manifest and goes on, bit for bit."""
    states = _states(5, seed=3)
    writer = ckptstore.create_store(tmp_path / "s", layout="hot", compaction="manual")
    for i, st in enumerate(states, 1):
        writer.save("r", i, st)
    reader = ckptstore.open_store(tmp_path / "s")
    if not cached:
        reader._manifests.max_records = 1
    traj = StoreTrajectory(reader, "r")
    old = traj._index[1]
    writer.compact("r")
    oid = old.tensors["model/enc.weight"]["object"]
    assert not writer.storage.exists(old.objects[oid]["pack"])  # the index names a freed pack
    got = list(traj.iter_tensor("enc.weight"))
    assert [x.tobytes() for x in got] == [st["model"]["enc.weight"].tobytes() for st in states]
    assert traj._index[1].objects != old.objects  # indexed again, from the compacted manifest
    assert traj._index[1].tensors == old.tensors
    assert traj.state_dict(2)["dec.weight"].numpy().tobytes() == states[2]["model"]["dec.weight"].tobytes()


def test_a_checkpoint_saved_again_with_other_weights_is_a_clear_error(tmp_path: Path) -> None:
    states = _states(4, seed=4)
    store = ckptstore.create_store(tmp_path / "s")
    for i, st in enumerate(states, 1):
        store.save("r", i, st)
    traj = StoreTrajectory(store, "r")
    other = ckptstore.open_store(tmp_path / "s")
    other.delete([f"r@{s}" for s in (1, 2, 3, 4)])
    for s in (1, 2, 3, 4):
        other.save("r", s, states[4 - s])  # the same names and shapes, other values
    with pytest.raises(TrajectoryError, match="changed while this trajectory was open"):
        list(traj.iter_tensor("enc.weight"))
