"""The Store: create/open, bit-exact save/load (numpy and torch), partial loads, refusals that leave the store
unchanged, delete/gc/verify, keyframe intervals and iteration."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
import ckptstore.store as store_module
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    InvalidNameError,
    InvalidStateError,
    StoreExistsError,
    StoreNotFoundError,
    TensorNotFoundError,
    UnsupportedVersionError,
)
from ckptstore.format.manifest import Manifest, object_id
from ckptstore.storage import open_storage
from ckptstore.store import Store

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------------------------------- helpers
def evolve(prev: dict[str, Any], i: int) -> dict[str, Any]:
    """The next state of a toy training run: small nudges (so deltas pay), one tensor that changes rarely,
    one that never changes, a tied pair, counters."""
    rng = np.random.default_rng(1000 + i)
    w = prev["w"].copy()
    idx = rng.random(w.size) < 0.3
    w.reshape(-1)[idx] = np.nextafter(w.reshape(-1)[idx], np.float32(np.inf if i % 2 else -np.inf))
    h = prev["h"].copy()
    h[rng.integers(0, h.size, 20)] += np.float16(0.01)
    rare = prev["rare"] if i % 3 else prev["rare"] + 1
    return {
        "w": w,
        "h": h,
        "rare": rare,
        "const": prev["const"],
        "tied": {"a": w, "b": w},
        "opt": {"state": {0: {"step": np.float32(i), "exp_avg": w * np.float32(0.1)}}, "lr": 0.1 / (i + 1)},
        "step": i,
        "counter": np.array(i, dtype=np.int64),
        "mask": w > 0,
    }


def initial_state(rng: np.random.Generator) -> dict[str, Any]:
    w = (rng.standard_normal((40, 50)) * 0.02).astype(np.float32)
    base = {
        "w": w,
        "h": rng.standard_normal(300).astype(np.float16),
        "rare": np.arange(500, dtype=np.int32),
        "const": rng.integers(0, 255, 700).astype(np.uint8),
    }
    return evolve(base, 0)


def make_run(
    store: Store, n: int, rng: np.random.Generator, run: str = "r", first: int = 0, every: int = 10
) -> dict[int, dict[str, Any]]:
    states = {}
    s = initial_state(rng)
    for i in range(n):
        step = first + i * every
        store.save(run, step, s, {"epoch": i, "metrics": {"loss": 1.0 / (i + 1)}})
        states[step] = s
        s = evolve(s, i + 1)
    return states


def check_all(store: Store, expected: dict[str, dict[int, Any]], same: Callable[[Any, Any], None]) -> None:
    """Every expected checkpoint loads bit-exactly, from this store object and from a fresh one."""
    fresh = ckptstore.open_store(store.url)
    assert fresh.runs() == sorted(r for r in expected if expected[r])
    for run, states in expected.items():
        assert store.steps(run) == sorted(states)
        assert fresh.steps(run) == sorted(states)
        for step, state in states.items():
            same(store.load(f"{run}@{step}"), state)
            same(fresh.load(f"{run}@{step}"), state)
    res = fresh.verify()
    assert res["ok"], res["problems"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return ckptstore.create_store(tmp_path / "store", keyframe_interval=4)


def pack_files(store: Store) -> list[str]:
    return store.storage.list("packs")


# ---------------------------------------------------------------------------------------------- create/open
def test_open_missing_store(tmp_path: Path) -> None:
    for p in (tmp_path / "nothing", tmp_path):
        with pytest.raises(StoreNotFoundError) as ei:
            ckptstore.open_store(p)
        assert isinstance(ei.value, FileNotFoundError)
        assert ei.value.hint
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("hello")
    with pytest.raises(StoreNotFoundError):
        ckptstore.open_store(tmp_path / "other")


@pytest.mark.parametrize("content", [b"not json", b"[]", b'{"format": "other", "version": 1}', b""])
def test_open_foreign_store_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "ckptstore.json").write_bytes(content)
    with pytest.raises(FormatError):
        ckptstore.open_store(tmp_path)


def test_open_newer_store(tmp_path: Path) -> None:
    ckptstore.create_store(tmp_path / "s")
    info = json.loads((tmp_path / "s" / "ckptstore.json").read_text())
    info["version"] = 99
    (tmp_path / "s" / "ckptstore.json").write_text(json.dumps(info))
    with pytest.raises(UnsupportedVersionError):
        ckptstore.open_store(tmp_path / "s")


def test_create_on_non_empty_dir_refused(tmp_path: Path, snapshot: Any) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(StoreExistsError) as ei:
        ckptstore.create_store(tmp_path / "d")
    assert isinstance(ei.value, FileExistsError)
    assert snapshot(tmp_path) == before


def test_create_twice_refused_and_exist_ok(tmp_path: Path, rng: np.random.Generator) -> None:
    s = ckptstore.create_store(tmp_path / "s")
    s.save("r", 1, {"x": np.arange(3)})
    with pytest.raises(StoreExistsError):
        ckptstore.create_store(tmp_path / "s")
    again = ckptstore.create_store(tmp_path / "s", exist_ok=True)
    assert again.steps("r") == [1]
    assert ckptstore.open_store(tmp_path / "new", create=True).runs() == []
    assert ckptstore.open_store(tmp_path / "new", create=True).runs() == []
    assert ckptstore.create_store(tmp_path / "fresh").runs() == []


def test_store_on_memory_filesystem(rng: np.random.Generator, assert_same_state: Any) -> None:
    url = f"memory://ckpt-{uuid.uuid4().hex}"
    s = ckptstore.create_store(url, keyframe_interval=3)
    states = make_run(s, 5, rng)
    s.delete(["r@20"])
    del states[20]
    check_all(s, {"r": states}, assert_same_state)
    assert s.gc()["removed_packs"] == 0


# ---------------------------------------------------------------------------------------------- numpy states
def test_numpy_roundtrip_bit_exact(store: Store, rng: np.random.Generator, assert_same_state: Any) -> None:
    state = {
        "f64": rng.standard_normal((3, 4)),
        "f32": np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], dtype=np.float32),
        "nan_payloads": np.array([0x7FC00001, 0xFFFFFFFF, 0x7F800001], dtype=np.uint32).view(np.float32),
        "f16": rng.standard_normal(100).astype(np.float16),
        "ints": [np.arange(-5, 5, dtype=d) for d in (np.int8, np.int16, np.int32, np.int64)],
        "uints": [np.arange(10, dtype=d) * 7 for d in (np.uint8, np.uint16, np.uint32, np.uint64)],
        "bool": rng.random(33) < 0.5,
        "c64": (rng.standard_normal(8) + 1j * rng.standard_normal(8)).astype(np.complex64),
        "c128": rng.standard_normal(8) + 1j * rng.standard_normal(8),
        "zero_d": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 7), np.float32),
        "big": rng.standard_normal(50_000).astype(np.float32),
        "plain": {"none": None, "nan": float("nan"), "tuple": (1, "a", b"\x00"), 3: "int key"},
        "scalars": [np.float32(1.5), np.int64(-3), np.bool_(False)],
    }
    info = store.save("r", 0, state, {"epoch": 0})
    assert info.ref == "r@0" and info.step == 0
    assert info.logical_bytes == sum(
        v.nbytes
        for v in [
            state["f64"],
            state["f32"],
            state["nan_payloads"],
            state["f16"],
            *state["ints"],
            *state["uints"],
            state["bool"],
            state["c64"],
            state["c128"],
            state["zero_d"],
            state["empty"],
            state["big"],
        ]
    )
    assert_same_state(store.load("r@0"), state)
    assert_same_state(ckptstore.open_store(store.url).load("r"), state)


def test_save_does_not_keep_references_to_caller_arrays(store: Store, assert_same_state: Any) -> None:
    """Training mutates tensors in place after a save; the stored data and later deltas must not notice."""
    x = np.linspace(0, 1, 5000, dtype=np.float32)
    store.save("r", 1, {"x": x})
    want1 = x.copy()
    x[::3] = np.nextafter(x[::3], np.float32(2))  # in-place update, as an optimizer step does
    store.save("r", 2, {"x": x})
    want2 = x.copy()
    x[:] = 0
    fresh = ckptstore.open_store(store.url)
    assert_same_state(fresh.load("r@1"), {"x": want1})
    assert_same_state(fresh.load("r@2"), {"x": want2})
    assert fresh.verify()["ok"]


def test_delta_bases_reused_in_place_stay_exact(tmp_path: Path, assert_same_state: Any) -> None:
    """A save overwrites the previous head copy of a tensor with the new one, in place. Tensors that shared an
    object (equal contents), a tensor whose new base another chain passes through, and many saves in a row with
    the caller mutating its arrays must all still come back exactly, from the same Store and a fresh one."""
    rng = np.random.default_rng(11)
    s = ckptstore.create_store(tmp_path / "s", threads=2, keyframe_interval=3)
    w = rng.standard_normal(20000).astype(np.float32)
    zeros_a, zeros_b = np.zeros(6000, np.float32), np.zeros(6000, np.float32)
    wants = []
    for step in range(1, 9):
        state = {"w": w, "a": zeros_a, "b": zeros_b, "w_copy": w.copy() if step % 2 else w * np.float32(1.5)}
        s.save("r", step, state)
        wants.append({k: v.copy() for k, v in state.items()})
        assert_same_state(s.load(f"r@{step}"), wants[-1])
        w += rng.standard_normal(w.size).astype(np.float32) * np.float32(1e-3)  # in place, like an optimizer
        zeros_a += np.float32(step)  # the two equal tensors diverge
        zeros_b -= np.float32(step)
    fresh = ckptstore.open_store(s.url)
    for step, want in enumerate(wants, 1):
        assert_same_state(s.load(f"r@{step}"), want)
        assert_same_state(fresh.load(f"r@{step}"), want)
    assert fresh.verify()["ok"]


def test_loaded_equal_tensors_are_independent(store: Store) -> None:
    """Two distinct tensors with equal contents are stored once, but must not come back as one shared array."""
    store.save("r", 1, {"a": np.zeros(16, np.float32), "b": np.zeros(16, np.float32)})
    for s in (store, ckptstore.open_store(store.url)):
        st = s.load("r@1")
        st["a"][0] = 5
        assert st["b"][0] == 0, "writing to one loaded tensor changed another"


def test_mutating_a_loaded_state_does_not_corrupt_later_saves(store: Store) -> None:
    """Load, modify in place (a resumed training run does this), save: the new checkpoint must be exact."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal(4000).astype(np.float32)
    store.save("r", 1, {"w": w})
    st = store.load("r@1")
    st["w"][:] = np.nextafter(st["w"], np.float32(np.inf))  # in-place "training step" on the loaded tensor
    w2 = st["w"].copy()
    store.save("r", 2, {"w": st["w"]})
    fresh = ckptstore.open_store(store.url)
    assert fresh.load("r@1")["w"].tobytes() == w.tobytes()
    assert fresh.load("r@2")["w"].tobytes() == w2.tobytes()
    assert fresh.verify()["ok"], fresh.verify()["problems"]


def test_save_out_of_order_steps(store: Store, rng: np.random.Generator, assert_same_state: Any) -> None:
    states = make_run(store, 3, rng, first=100)
    s = initial_state(np.random.default_rng(5))
    store.save("r", 105, s)
    store.save("r", 0, s)
    states.update({105: s, 0: s})
    check_all(store, {"r": states}, assert_same_state)


def test_several_runs_are_independent(store: Store, rng: np.random.Generator, assert_same_state: Any) -> None:
    a = make_run(store, 3, rng, run="a")
    b = make_run(store, 2, rng, run="b", every=7)
    assert store.runs() == ["a", "b"]
    check_all(store, {"a": a, "b": b}, assert_same_state)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threads_do_not_change_results(tmp_path: Path, threads: int, assert_same_state: Any) -> None:
    s = ckptstore.create_store(tmp_path / "s", threads=threads)
    states = make_run(s, 4, np.random.default_rng(0))
    check_all(s, {"r": states}, assert_same_state)


# ---------------------------------------------------------------------------------------------- torch states
def _model_and_optimizer() -> tuple[Any, Any]:
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16)
            self.lin = torch.nn.Linear(16, 32)
            self.norm = torch.nn.LayerNorm(32)
            self.out = torch.nn.Linear(32, 20, bias=False)
            self.register_buffer("mask", torch.rand(20) > 0.5)
            self.register_buffer("seen", torch.tensor(0, dtype=torch.int64))

        def forward(self, x: Any) -> Any:
            return self.out(self.norm(torch.relu(self.lin(self.emb(x)))))

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    return net, opt


def _train(net: Any, opt: Any, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 20, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.seen += 1


def _torch_state(net: Any, opt: Any) -> dict[str, Any]:
    w = net.lin.weight.detach()
    return {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "extra": {
            "bf16": w.to(torch.bfloat16),
            "fp16": w.to(torch.float16),
            "f64": w.double(),
            "step": torch.tensor(12345678901, dtype=torch.int64),
            "zero_d": torch.tensor(2.5),
            "transposed": w.t(),
            "strided": w[::2, 1::3],
            "expanded": torch.ones(3).expand(4, 3),
            "empty": torch.zeros(0, 3),
            "int8": torch.arange(-8, 8, dtype=torch.int8),
            "c64": torch.randn(4, dtype=torch.complex64),
            "u8": torch.arange(256, dtype=torch.uint8),
            "special": torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45]),
        },
    }


def test_torch_roundtrip_bit_exact(store: Store, assert_same_state: Any) -> None:
    net, opt = _model_and_optimizer()
    _train(net, opt, 3)
    state = _torch_state(net, opt)
    assert set(state["optimizer"]["state"][0]) >= {"step", "exp_avg", "exp_avg_sq"}
    store.save("t", 3, state, {"epoch": 1})
    got = store.load("t@3")  # saved from torch → torch by default
    assert isinstance(got["model"]["lin.weight"], torch.Tensor)
    assert_same_state(got, state)
    assert_same_state(ckptstore.open_store(store.url).load("t@3", tensors="torch"), state)


def test_torch_resume_trains_exactly_like_uninterrupted(store: Store) -> None:
    """Restoring model + AdamW from the store and training on gives the same weights as never stopping."""
    net, opt = _model_and_optimizer()
    _train(net, opt, 3)
    store.save("t", 3, {"model": net.state_dict(), "optimizer": opt.state_dict()})
    got = store.load("t@3")
    steps = [s["step"] for s in got["optimizer"]["state"].values()]
    assert len({t.data_ptr() for t in steps}) == len(steps), "loaded per-parameter step counters share memory"
    net2, opt2 = _model_and_optimizer()
    net2.load_state_dict(got["model"])
    opt2.load_state_dict(got["optimizer"])
    _train(net, opt, 2, seed=1)
    _train(net2, opt2, 2, seed=1)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_torch_checkpoint_as_numpy(store: Store) -> None:
    t = torch.randn(5, 3)
    state = {"bf": t.to(torch.bfloat16), "f": t, "i": torch.arange(4), "b": t > 0}
    store.save("t", 1, state)
    got = store.load("t@1", tensors="numpy")
    assert got["bf"].dtype == np.uint16 and got["bf"].shape == (5, 3)
    assert got["bf"].tobytes() == state["bf"].view(torch.int16).numpy().tobytes()
    assert got["f"].dtype == np.float32 and got["f"].tobytes() == t.numpy().tobytes()
    assert got["i"].dtype == np.int64 and got["i"].tolist() == [0, 1, 2, 3]
    assert got["b"].dtype == np.bool_ and got["b"].tolist() == (t > 0).tolist()


def test_numpy_checkpoint_as_torch(store: Store) -> None:
    a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    store.save("n", 1, {"a": a, "c": np.arange(3, dtype=np.uint16)})
    got = store.load("n@1", tensors="torch")
    assert isinstance(got["a"], torch.Tensor) and got["a"].dtype == torch.float32
    assert got["a"].numpy().tobytes() == a.tobytes()
    assert isinstance(store.load("n@1")["a"], np.ndarray)
    with pytest.raises(ValueError):
        store.load("n@1", tensors="jax")


def test_tied_weights_stored_once(store: Store) -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied, as language models do
    state = {
        "emb.weight": emb.weight,
        "head.weight": head.weight,
        "twice": [emb.weight, emb.weight],
        "other": torch.randn(4),
        "copy_of_other": None,
    }
    state["copy_of_other"] = state["other"].clone()  # equal contents, distinct tensor: also stored once
    store.save("t", 1, state)
    m = store.resolve("t@1")
    assert len(m.tensors) == 6
    assert len(m.objects) == 2
    assert m.tensors["emb.weight"]["object"] == m.tensors["head.weight"]["object"]
    assert len({r["offset"] for r in m.objects.values()}) == 2
    pack = m.data["packs"][0]
    assert store.storage.size(pack) == 16 + sum(r["length"] for r in m.objects.values())
    got = store.load("t@1")
    assert torch.equal(got["twice"][1], emb.weight.detach())


def test_torch_resume_train_save_keeps_every_checkpoint_exact(tmp_path: Path) -> None:
    """The ckptstore.torch helpers in a resume loop: save, restore into live objects, train, save again —
    in one process, with the store's cache warm. Every checkpoint must decode exactly from a fresh store."""
    from ckptstore import torch as ct

    store = ckptstore.create_store(tmp_path / "s")
    net, opt = _model_and_optimizer()
    _train(net, opt, 2)
    ct.save(store, "run", 2, net, opt, extra={"epoch": 1})
    expected = {2: {k: v.clone() for k, v in net.state_dict().items()}}
    net2, opt2 = _model_and_optimizer()
    extra = ct.restore(store, "run@latest", net2, opt2)
    assert extra == {"epoch": 1}
    for step in (3, 4, 5):
        _train(net2, opt2, 1, seed=step)
        ct.save(store, "run", step, net2, opt2, extra={"epoch": step})
        expected[step] = {k: v.clone() for k, v in net2.state_dict().items()}
    fresh = ckptstore.open_store(store.url)
    res = fresh.verify()
    assert res["ok"], res["problems"]
    for step, sd in expected.items():
        got = fresh.load(f"run@{step}")["model"]
        for k, v in sd.items():
            assert torch.equal(got[k], v), (step, k)


# ---------------------------------------------------------------------------------------------- partial loads
def test_load_tensor_reads_only_its_chain(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = ckptstore.create_store(tmp_path / "s", keyframe_interval=8)
    states = make_run(s, 5, rng)
    fresh = ckptstore.open_store(tmp_path / "s")
    m = fresh.resolve("r@40")
    oid = m.tensors["w"]["object"]
    chain = m.chain(oid)
    assert len(chain) >= 2, "the test wants a delta chain"
    reads: list[tuple[str, int, int]] = []
    full_reads: list[str] = []
    orig_range, orig_read = fresh.storage.read_range, fresh.storage.read

    def read_range(key: str, start: int, length: int) -> bytes:
        reads.append((key, start, length))
        return orig_range(key, start, length)

    def read(key: str) -> bytes:
        full_reads.append(key)
        return orig_read(key)

    monkeypatch.setattr(fresh.storage, "read_range", read_range)
    monkeypatch.setattr(fresh.storage, "read", read)
    w = fresh.load_tensor("r@40", "w")
    assert w.tobytes() == states[40]["w"].tobytes()
    want = sorted((m.objects[o]["pack"], m.objects[o]["offset"], m.objects[o]["length"]) for o in chain)
    assert sorted(reads) == want
    assert sum(length for _, _, length in reads) == sum(m.objects[o]["length"] for o in chain)
    assert not [k for k in full_reads if k.startswith("packs/")]
    # nested names and torch output
    exp = fresh.load_tensor("r@40", "opt/state/0/exp_avg", tensors="torch")
    assert isinstance(exp, torch.Tensor)
    assert exp.numpy().tobytes() == states[40]["opt"]["state"][0]["exp_avg"].tobytes()


def test_load_tensor_missing(store: Store) -> None:
    store.save("r", 1, {"a": np.zeros(3)})
    with pytest.raises(TensorNotFoundError) as ei:
        store.load_tensor("r@1", "b")
    assert isinstance(ei.value, KeyError) and "b" in str(ei.value)
    with pytest.raises(CheckpointNotFoundError):
        store.load_tensor("r@2", "a")


def test_iter_load_yields_every_checkpoint_in_order(
    store: Store, rng: np.random.Generator, assert_same_state: Any
) -> None:
    states = make_run(store, 6, rng)
    fresh = ckptstore.open_store(store.url)
    seen = []
    for m, state in fresh.iter_load("r"):
        assert isinstance(m, Manifest)
        seen.append(m.step)
        assert_same_state(state, states[m.step])
    assert seen == sorted(states)
    assert list(fresh.iter_load("nope")) == []


def test_iter_load_keeps_only_the_next_checkpoints_bases(tmp_path: Path, rng: np.random.Generator) -> None:
    """Between two checkpoints iter_load keeps decoded only what the next few are coded against or share (a
    segment's deltas go back to its root, at most keyframe_interval checkpoints: memory near three checkpoints
    whatever the chain), in private copies: the caller changing every array it gets in place changes nothing that
    follows."""
    store = ckptstore.create_store(tmp_path / "s.store", keyframe_interval=3)
    states = {}
    w = rng.standard_normal(5000).astype(np.float32)
    for step in range(1, 12):
        w = (w + rng.standard_normal(5000).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        states[step] = {"w": w.copy(), "fixed": np.arange(100.0), f"only{step}": np.full(50, float(step))}
        store.save("r", step, states[step])
    fresh = ckptstore.open_store(store.url)
    kept: list[tuple[int, dict[str, np.ndarray]]] = []
    real = fresh._load_leaves

    def spy(m: Manifest, names: Any, known: Any, *rest: Any) -> Any:
        kept.append((m.step, dict(known or {})))
        return real(m, names, known, *rest)

    fresh._load_leaves = spy  # type: ignore[method-assign]
    for m, state in fresh.iter_load("r", tensors="numpy"):
        assert {k: v.tobytes() for k, v in state.items()} == {k: v.tobytes() for k, v in states[m.step].items()}
        for v in state.values():
            v[...] = 0  # the caller reuses what it got
    assert [s for s, _ in kept] == list(range(1, 12))
    steps = fresh.steps("r")
    for step, known in kept[1:]:
        needed: set[str] = set()
        for later in steps[step - 1 : step - 1 + store.keyframe_interval + 1]:
            f = fresh.manifest("r", later)
            objs = {t["object"] for t in f.tensors.values()}
            needed |= objs | {f.objects[o].get("refs", {}).get("prev") for o in objs}
        assert known and set(known) <= needed, step  # nothing this or the next few need ("only<k-1>" is dropped)
        assert not any(f"only{step - 1}" in n for n in known)
        m = fresh.manifest("r", step)
        assert sum(a.nbytes for a in known.values()) <= 2 * m.info().logical_bytes


def test_iter_load_decodes_each_object_once(tmp_path: Path, rng: np.random.Generator) -> None:
    """Read in order, a layout whose segments' deltas go back to their roots (the planner's, keyframe_interval
    checkpoints apart) reads every stored object once: the roots stay decoded until the last delta on them."""
    store = ckptstore.create_store(tmp_path / "s.store", keyframe_interval=3)
    w = rng.standard_normal(1 << 16).astype(np.float32)
    small = rng.standard_normal(300).astype(np.float32)
    for step in range(1, 14):
        w = (w + rng.standard_normal(w.size).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        small = (small * np.float32(0.999)).astype(np.float32)
        store.save("r", step, {"w": w, "small": small})
    fresh = ckptstore.open_store(store.url)
    roots_reused = 0
    for step in fresh.steps("r"):
        m = fresh.manifest("r", step)
        o = m.tensors["w"]["object"]
        prev = m.objects[o].get("refs", {}).get("prev")
        if prev is not None and prev != fresh.manifest("r", step - 1).tensors["w"]["object"]:
            roots_reused += 1  # a delta against an object of an earlier checkpoint than the one before
    assert roots_reused >= 2  # the layout this test is about
    read: list[str] = []
    real = fresh._payload

    def spy(m: Manifest, oid: str, rec: Any) -> Any:
        read.append(oid)
        return real(m, oid, rec)

    fresh._payload = spy  # type: ignore[method-assign]
    for _ in fresh.iter_load("r"):
        pass
    assert len(read) == len(set(read))
    assert set(read) == {o for s in fresh.steps("r") for o in fresh.manifest("r", s).objects}

    def chain(step: int) -> list[str]:
        m, out = fresh.manifest("r", step), []
        o = m.tensors["w"]["object"]
        while o is not None:
            out.append(o)
            o = m.objects[o].get("refs", {}).get("prev")
        return out

    deepest = max(fresh.steps("r"), key=lambda s: len(chain(s)))
    read.clear()
    fresh.load(f"r@{deepest}")  # a single load walks the chain: the spy sees every object read
    assert len(chain(deepest)) >= 2 and set(chain(deepest)) <= set(read)


def test_iter_load_copies_into_spent_bases_only(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies iter_load keeps for the next checkpoint go into the memory of bases nothing reads again (a
    delta's base read once); never into a base two tensors read (twins sharing an object), one the checkpoint
    hands out (an unchanged tensor) or one the next checkpoint needs. The caller zeroing everything it gets
    changes nothing that follows."""
    store = ckptstore.create_store(tmp_path / "s.store", keyframe_interval=4)
    states = {}
    w = rng.standard_normal(6000).astype(np.float32)
    t = rng.standard_normal(3000).astype(np.float32)
    fixed = np.arange(200.0)
    for step in range(1, 9):
        w = (w + rng.standard_normal(w.size).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        t = (t + rng.standard_normal(t.size).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        states[step] = {"w": w.copy(), "twin_a": t.copy(), "twin_b": t.copy(), "fixed": fixed.copy()}
        store.save("r", step, states[step])
    fresh = ckptstore.open_store(store.url)
    spent: list[tuple[int, set[str]]] = []
    real = store_module._spent_bases

    def spy(m: Manifest, known: Any, wanted: set[str]) -> dict[str, np.ndarray]:
        out = real(m, known, wanted)
        spent.append((m.step, set(out)))
        return out

    monkeypatch.setattr(store_module, "_spent_bases", spy)
    into_spent = []
    real_copy = store_module._private_copy

    def copy_spy(words: np.ndarray, rec: Any, recycle: Any, *more: Any) -> np.ndarray:
        offered = {id(a) for a in (recycle or {}).values()}
        out = real_copy(words, rec, recycle, *more)
        into_spent.append(id(out) in offered)
        return out

    monkeypatch.setattr(store_module, "_private_copy", copy_spy)
    reused = 0
    decoded: set[str] = set()
    for m, state in fresh.iter_load("r", tensors="numpy"):
        assert {k: v.tobytes() for k, v in state.items()} == {k: v.tobytes() for k, v in states[m.step].items()}
        for v in state.values():
            v[...] = 0  # the caller reuses what it got
        bases = {m.objects[t["object"]].get("refs", {}).get("prev") for t in m.tensors.values()}
        assert spent[-1][1] <= bases & decoded  # decoded before, read by this one's deltas for the last time
        later = fresh.steps("r")[m.step :]
        for s in later:
            f = fresh.manifest("r", s)
            assert not spent[-1][1] & {f.objects[t["object"]].get("refs", {}).get("prev") for t in f.tensors.values()}
        decoded |= set(m.objects)
        reused += len(spent[-1][1])
    assert reused > 0 and any(into_spent)  # "w" changes every step: its base is spent at every delta
    for step, objs in spent:
        m = fresh.manifest("r", step)
        twin = m.objects[m.tensors["twin_a"]["object"]]
        assert twin.get("refs", {}).get("prev") not in objs  # read by two tensors
        assert m.tensors["fixed"]["object"] not in objs  # handed out unchanged


# ---------------------------------------------------------------------------------------------- refusals
def test_duplicate_step_refused_store_unchanged(
    store: Store, rng: np.random.Generator, snapshot: Any, assert_same_state: Any
) -> None:
    states = make_run(store, 2, rng)
    before = snapshot(store.url)
    with pytest.raises(CheckpointExistsError) as ei:
        store.save("r", 10, {"x": np.ones(5)}, {"epoch": 9})
    assert isinstance(ei.value, FileExistsError) and ei.value.hint
    assert snapshot(store.url) == before
    check_all(store, {"r": states}, assert_same_state)


class _Opaque:
    pass


@pytest.mark.parametrize(
    "metadata",
    [
        {"loss": float("nan")},
        {"loss": float("inf")},
        {"nested": {"x": [1, -float("inf")]}},
        {"obj": _Opaque()},
        {"np": np.float32(1.0)},
        {"arr": np.zeros(2)},
        {"set": {1, 2}},
        {"bytes": b"x"},
    ],
)
def test_bad_metadata_refused_store_unchanged(
    store: Store, rng: np.random.Generator, snapshot: Any, metadata: dict[str, Any]
) -> None:
    make_run(store, 2, rng)
    before = snapshot(store.url)
    with pytest.raises(InvalidStateError):
        store.save("r", 99, {"x": np.ones(5)}, metadata)
    with pytest.raises(InvalidStateError):
        store.save("newrun", 0, {"x": np.ones(5)}, metadata)
    assert snapshot(store.url) == before
    assert store.steps("r") == [0, 10]


@pytest.mark.parametrize(
    ("run", "step", "state", "error"),
    [
        ("r", 99, {"x": _Opaque()}, InvalidStateError),
        ("r", 99, {"..": np.ones(2)}, InvalidNameError),
        ("r", 99, {"a/b": np.ones(2)}, InvalidNameError),
        ("r", 99, {0: np.ones(2), "0": np.ones(2)}, InvalidStateError),
        ("r", 99, np.ones(2), InvalidStateError),
        ("../evil", 1, {"x": np.ones(2)}, InvalidNameError),
        ("r/x", 1, {"x": np.ones(2)}, InvalidNameError),
        ("r\n", 1, {"x": np.ones(2)}, InvalidNameError),
        ("r", -1, {"x": np.ones(2)}, InvalidNameError),
        ("r", 1.5, {"x": np.ones(2)}, InvalidNameError),
        ("r", True, {"x": np.ones(2)}, InvalidNameError),
    ],
)
def test_bad_saves_refused_store_unchanged(
    store: Store, rng: np.random.Generator, snapshot: Any, run: Any, step: Any, state: Any, error: type[Exception]
) -> None:
    make_run(store, 2, rng)
    before = snapshot(store.url)
    with pytest.raises(error):
        store.save(run, step, state)
    assert snapshot(store.url) == before


def test_failing_pack_write_leaves_store_unchanged(
    store: Store, rng: np.random.Generator, snapshot: Any, monkeypatch: pytest.MonkeyPatch, assert_same_state: Any
) -> None:
    """An error while the pack streams out (disk full ...) aborts the save without a trace."""
    states = make_run(store, 2, rng)
    before = snapshot(store.url)
    orig = store.storage.open_writer

    class Boom(Exception):
        pass

    def open_writer(key: str) -> Any:
        w = orig(key)
        real_write = w.write
        calls = {"n": 0}

        def write(data: Any) -> None:
            calls["n"] += 1
            if calls["n"] > 2:
                raise Boom("disk full")
            real_write(data)

        w.write = write  # type: ignore[method-assign]
        return w

    monkeypatch.setattr(store.storage, "open_writer", open_writer)
    with pytest.raises(Boom):
        store.save("r", 20, evolve(states[10], 2))
    monkeypatch.undo()
    assert snapshot(store.url) == before
    check_all(store, {"r": states}, assert_same_state)
    store.save("r", 20, evolve(states[10], 2))


# ---------------------------------------------------------------------------------------------- delete
@pytest.mark.parametrize(
    "doomed", [[30], [0], [70], [10, 40, 60], [0, 10, 20], [20, 30], [0, 70], [10, 20, 30, 40, 50, 60, 70]], ids=str
)
@pytest.mark.parametrize("interval", [3, 8])
def test_delete_keeps_others_bit_exact(
    tmp_path: Path, doomed: list[int], interval: int, assert_same_state: Any
) -> None:
    store = ckptstore.create_store(tmp_path / "s", keyframe_interval=interval)
    states = make_run(store, 8, np.random.default_rng(3))
    other = make_run(store, 3, np.random.default_rng(4), run="other")
    res = store.delete([f"r@{s}" for s in doomed])
    assert res["deleted"] == sorted(f"r@{s}" for s in doomed)
    assert res["freed_bytes"] >= 0
    for s in doomed:
        del states[s]
        with pytest.raises(CheckpointNotFoundError):
            store.load(f"r@{s}")
    check_all(store, {"r": states, "other": other}, assert_same_state)
    # nothing left for gc, and every remaining chain still respects the keyframe interval
    assert store.gc()["removed_packs"] == 0
    _check_depths(ckptstore.open_store(store.url), interval)
    # the run goes on after the delete
    nxt = evolve(states[max(states)] if states else initial_state(np.random.default_rng(0)), 99)
    store.save("r", 1000, nxt)
    states[1000] = nxt
    check_all(store, {"r": states, "other": other}, assert_same_state)


def _copy_memory_store(src: Store) -> Store:
    url = f"memory://ckpt-copy-{uuid.uuid4().hex}"
    dst = open_storage(url)
    for key in src.storage.list(""):
        dst.write(key, src.storage.read(key))
    return ckptstore.open_store(url, keyframe_interval=src.keyframe_interval)


@pytest.mark.parametrize("interval", [2, 3, 4])
def test_delete_windows_keep_chains_bounded(interval: int) -> None:
    """Delete every window of 1-3 consecutive checkpoints of a 10-checkpoint run (each on a fresh copy): the rest
    stay bit-exact and no delta chain grows past keyframe_interval (the bound reads rely on)."""
    base = ckptstore.create_store(f"memory://ckpt-windows-{uuid.uuid4().hex}", keyframe_interval=interval)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(2000).astype(np.float32)
    states = {}
    for i in range(10):
        idx = np.random.default_rng(i).random(w.size) < 0.3
        w = w.copy()
        w[idx] = np.nextafter(w[idx], np.float32(np.inf if i % 2 else -np.inf))
        base.save("r", i, {"w": w})
        states[i] = w
    problems = []
    for length in (1, 2, 3):
        for start in range(10 - length + 1):
            doomed = list(range(start, start + length))
            s = _copy_memory_store(base)
            s.delete([f"r@{d}" for d in doomed])
            for step in s.steps("r"):
                m = s.manifest("r", step)
                chain = m.chain(m.tensors["w"]["object"])
                if len(chain) > interval:
                    problems.append(f"delete {doomed}: r@{step} chain of {len(chain)} objects")
                if s.load(f"r@{step}")["w"].tobytes() != states[step].tobytes():
                    problems.append(f"delete {doomed}: r@{step} loads different bytes")
            assert s.steps("r") == [i for i in range(10) if i not in doomed]
    assert not problems, problems


def test_delete_rebase_onto_identical_predecessor(store: Store, assert_same_state: Any) -> None:
    """After a delete, a checkpoint's new predecessor can hold the very same tensor contents (here: saved out of
    order). Re-encoding must not make the object a delta of itself."""
    a = np.linspace(-1, 1, 4000, dtype=np.float32)
    b = a.copy()
    b[::5] = np.nextafter(b[::5], np.float32(2))
    store.save("r", 1, {"w": a})
    store.save("r", 2, {"w": b})  # a delta against step 1
    store.save("r", 0, {"w": b})  # earlier step, same contents as step 2
    store.delete(["r@1"])  # step 2 is rebased onto step 0
    m = ckptstore.open_store(store.url).resolve("r@2")
    for oid, rec in m.objects.items():
        assert oid not in rec.get("refs", {}).values(), "object refers to itself"
    check_all(store, {"r": {0: {"w": b}, 2: {"w": b}}}, assert_same_state)


def test_delete_one_at_a_time_until_empty(
    store: Store, rng: np.random.Generator, assert_same_state: Any, snapshot: Any
) -> None:
    states = make_run(store, 6, rng)
    for step in [30, 0, 50, 10, 40, 20]:
        store.delete([f"r@{step}"])
        del states[step]
        check_all(store, {"r": states}, assert_same_state)
    assert store.runs() == []
    assert pack_files(store) == []


def test_delete_with_references_in_every_form(store: Store, rng: np.random.Generator, assert_same_state: Any) -> None:
    states = make_run(store, 5, rng)
    res = store.delete(["r@first", "r@latest", "r@epoch=2", "r@best:loss:max", "r@0"])
    assert res["deleted"] == ["r@0", "r@20", "r@40"]
    for s in (0, 20, 40):
        del states[s]
    check_all(store, {"r": states}, assert_same_state)


def test_delete_missing_refused_store_unchanged(store: Store, rng: np.random.Generator, snapshot: Any) -> None:
    make_run(store, 3, rng)
    before = snapshot(store.url)
    with pytest.raises(CheckpointNotFoundError):
        store.delete(["r@10", "r@11"])
    assert snapshot(store.url) == before


def test_delete_frees_space(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    rng = np.random.default_rng(0)
    for step in range(4):  # incompressible, unrelated states: every checkpoint owns its bytes
        store.save("r", step, {"x": rng.standard_normal(20_000)})
    size = store.stats()["pack_bytes"]
    res = store.delete(["r@1", "r@2"])
    assert res["freed_bytes"] > 0.4 * size
    assert store.stats()["pack_bytes"] == size - res["freed_bytes"]


# ---------------------------------------------------------------------------------------------- gc
def test_gc_removes_orphans_only(store: Store, rng: np.random.Generator, assert_same_state: Any) -> None:
    states = make_run(store, 4, rng)
    root = Path(store.url)
    live = set(pack_files(store))
    src = root / sorted(live)[0]
    orphans = [root / "packs" / "r" / f"{99:020d}-deadbeef0000.pack", root / "packs" / "ghost" / "x.pack"]
    for o in orphans:
        o.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, o)
    tmp_pack = root / "packs" / "r" / "00000000000000000050-abc.pack.tmp-123456789abc"
    tmp_pack.write_bytes(b"partial")
    tmp_manifest = root / "runs" / "r" / "ckpt" / f"{50:020d}.json.tmp-0123456789ab"
    tmp_manifest.write_bytes(b"{partial")
    res = store.gc()
    assert res["removed_packs"] == 3
    assert res["freed_bytes"] == 2 * src.stat().st_size + len(b"partial")
    assert set(pack_files(store)) == live
    assert not any(o.exists() for o in orphans) and not tmp_pack.exists() and not tmp_manifest.exists()
    check_all(store, {"r": states}, assert_same_state)
    assert store.gc() == {"removed_packs": 0, "freed_bytes": 0}


def test_gc_on_empty_store(store: Store) -> None:
    assert store.gc()["removed_packs"] == 0
    assert store.verify() == {"checkpoints": 0, "objects": 0, "problems": [], "affected": {}, "ok": True}


# ---------------------------------------------------------------------------------------------- verify
def _objects_by_pack(store: Store) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for run in store.runs():
        for step in store.steps(run):
            for rec in store.manifest(run, step).objects.values():
                out.setdefault(rec["pack"], {})[rec["offset"]] = rec
    return {p: list(v.values()) for p, v in out.items()}


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_verify_detects_each_corrupted_byte(tmp_path: Path, where: str) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    make_run(store, 3, np.random.default_rng(0))
    fresh = ckptstore.open_store(store.url)
    assert fresh.verify()["ok"]
    root = Path(store.url)
    for pack, recs in _objects_by_pack(fresh).items():
        for rec in recs:
            if rec["length"] == 0:
                continue
            pos = rec["offset"] + {"first": 0, "middle": rec["length"] // 2, "last": rec["length"] - 1}[where]
            path = root / pack
            data = bytearray(path.read_bytes())
            data[pos] ^= 0x5A
            path.write_bytes(bytes(data))
            res = ckptstore.open_store(store.url).verify()
            assert not res["ok"] and res["problems"], f"flip at {pack}:{pos} not detected"
            data[pos] ^= 0x5A
            path.write_bytes(bytes(data))
    assert ckptstore.open_store(store.url).verify()["ok"]


def test_verify_detects_missing_and_truncated_packs(store: Store, rng: np.random.Generator) -> None:
    make_run(store, 3, rng)
    root = Path(store.url)
    packs = pack_files(store)
    last = root / packs[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    res = ckptstore.open_store(store.url).verify()
    assert not res["ok"] and any("r@20" in p for p in res["problems"])
    os.remove(root / packs[0])
    res = ckptstore.open_store(store.url).verify()
    assert sorted(res["affected"]) == ["r@0", "r@10", "r@20"]  # every checkpoint depends on the first pack
    m0 = ckptstore.open_store(store.url).manifest("r", 0)
    assert res["affected"]["r@0"] == sorted(m0.tensors)  # each damaged tensor by name, one problem line each
    assert sum(p.startswith("r@0: tensor ") for p in res["problems"]) == len(m0.tensors)
    assert any(p.startswith(packs[0]) and "r@0, r@10, r@20" in p for p in res["problems"])  # its header too
    assert res["checkpoints"] == 3


def test_verify_reports_damaged_manifest(store: Store, rng: np.random.Generator) -> None:
    make_run(store, 2, rng)
    (Path(store.url) / "runs" / "r" / "ckpt" / f"{10:020d}.json").write_text("{not json")
    res = ckptstore.open_store(store.url).verify()
    assert not res["ok"] and len(res["problems"]) == 1 and "r@10" in res["problems"][0]


def test_load_of_corrupted_data_raises_instead_of_returning_wrong_bytes(tmp_path: Path) -> None:
    """A damaged pack must not load as silently different tensors: load raises IntegrityError (a content hash
    is stored for every object, so checking it costs one pass over the decoded bytes)."""
    store = ckptstore.create_store(tmp_path / "s")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2000)  # incompressible mantissas: stored as raw planes
    store.save("r", 1, {"x": x})
    m = store.resolve("r@1")
    rec = m.objects[m.tensors["x"]["object"]]
    path = Path(store.url) / rec["pack"]
    data = bytearray(path.read_bytes())
    data[rec["offset"] + rec["length"] // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = ckptstore.open_store(store.url)
    try:
        got = fresh.load("r@1")["x"]
    except IntegrityError:
        return
    assert got.tobytes() == x.tobytes(), "load returned silently corrupted data"


def _many_small(rng: np.random.Generator, i: int, prev: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A state of many small tensors, as a real model's biases and norms: the batch decoder's share of a load."""
    if prev is None:
        return {f"t{j}": (rng.standard_normal(300 + 37 * j) * 0.02).astype(np.float32) for j in range(40)} | {
            "h": rng.standard_normal(900).astype(np.float16),
            "steps": np.arange(700, dtype=np.int64),
        }
    out = {k: (v * np.float32(0.999) + np.float32(1e-4)).astype(np.float32) for k, v in prev.items() if k[0] == "t"}
    return out | {"h": prev["h"], "steps": prev["steps"] + i}


def test_small_tensors_load_through_the_batch_decoder_bit_exactly(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loads in order and singly go through native.decode_many for keyframes and deltas alike, and give the
    bytes the codec chain gives (native off)."""
    from ckptstore.codecs import native

    if not native.available:
        pytest.skip("the C kernels were not built (optional extension)")
    store = ckptstore.create_store(tmp_path / "s", keyframe_interval=3)
    states: dict[int, dict[str, np.ndarray]] = {}
    prev = None
    for step in range(1, 7):
        prev = states[step] = _many_small(rng, step, prev)
        store.save("r", step, prev)
    seen: list[tuple[bool, int]] = []
    real = native.decode_many

    def spy(items: Any) -> bytes:
        seen.extend((it[3] is not None, it[2].size) for it in items)
        return real(items)

    monkeypatch.setattr(native, "decode_many", spy)
    fresh = ckptstore.open_store(store.url)
    for m, state in fresh.iter_load("r", tensors="numpy"):
        assert all(state[k].tobytes() == states[m.step][k].tobytes() for k in states[m.step]), m.step
    for step in states:
        got = ckptstore.open_store(store.url).load(f"r@{step}", tensors="numpy")
        assert all(got[k].tobytes() == states[step][k].tobytes() for k in states[step]), step
    assert any(d for d, _ in seen) and any(not d for d, _ in seen)  # deltas and keyframes both went through it
    # a single load of a checkpoint two deltas from its keyframe decodes whole chains in C, a depth per call:
    # the second delta's base is the array the first one was decoded into
    outs: list[list[Any]] = []
    monkeypatch.setattr(native, "decode_many", lambda items: (outs.append(list(items)), real(items))[1])
    deep = max(states, key=lambda s: max(int(r.get("depth", 0)) for r in store.manifest("r", s).objects.values()))
    assert max(int(r.get("depth", 0)) for r in store.manifest("r", deep).objects.values()) == 2
    got = ckptstore.open_store(store.url).load(f"r@{deep}", tensors="numpy")
    assert all(got[k].tobytes() == states[deep][k].tobytes() for k in states[deep])
    made = {id(it[2]) for call in outs[:-1] for it in call}
    assert any(it[3] is not None and id(it[3]) in made for call in outs[2:] for it in call)
    monkeypatch.setattr(native, "available", False)
    seen.clear()
    for step in states:
        got = ckptstore.open_store(store.url).load(f"r@{step}", tensors="numpy")
        assert all(got[k].tobytes() == states[step][k].tobytes() for k in states[step]), step
    assert seen == []


def test_a_damaged_payload_in_a_batch_is_reported_by_the_chain(tmp_path: Path, rng: np.random.Generator) -> None:
    """The batch decoder leaves a payload it cannot read to the codec chain, which names the object."""
    store = ckptstore.create_store(tmp_path / "s")
    state = _many_small(rng, 1, None)
    store.save("r", 1, state)
    m = store.resolve("r@1")
    oid = m.tensors["t5"]["object"]
    rec = m.objects[oid]
    assert rec["codecs"][-1]["name"] == "planes-zstd"
    path = Path(store.url) / rec["pack"]
    data = bytearray(path.read_bytes())
    data[rec["offset"]] = 7  # the payload's plane count
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=oid[:20]):
        ckptstore.open_store(store.url).load("r@1")
    assert ckptstore.open_store(store.url).load_tensor("r@1", "t4", tensors="numpy").tobytes() == state["t4"].tobytes()


def test_a_forged_object_shape_in_a_batch_is_an_integrity_error(tmp_path: Path, rng: np.random.Generator) -> None:
    """An object record claiming 256 GiB (re-checksummed, so it passes the structure check) is the chain's
    IntegrityError naming it, not a MemoryError from allocating the batch decoder's output."""
    from ckptstore.format.manifest import manifest_bytes, parse_manifest

    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, _many_small(rng, 1, None))
    f = sorted((tmp_path / "s" / "runs").rglob("*.json"))[-1]
    doc = parse_manifest(f.read_bytes(), str(f))
    oid = doc["tensors"]["t5"]["object"]
    doc["objects"][oid]["shape"] = [2**36]
    f.write_bytes(manifest_bytes(doc))
    with pytest.raises(IntegrityError, match="does not fit in memory"):
        ckptstore.open_store(tmp_path / "s").load("r@1")


# ---------------------------------------------------------------------------------------------- keyframes
def _check_depths(store: Store, interval: int) -> list[int]:
    depths = []
    for run in store.runs():
        for step in store.steps(run):
            m = store.manifest(run, step)
            for o, rec in m.objects.items():
                assert rec.get("depth", 0) < interval, (run, step, o, rec)
                depths.append(rec.get("depth", 0))
            for name, t in m.tensors.items():
                assert len(m.chain(t["object"])) <= interval, (run, step, name)
    return depths


@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_keyframe_interval_bounds_chains(tmp_path: Path, interval: int, assert_same_state: Any) -> None:
    store = ckptstore.create_store(tmp_path / "s", keyframe_interval=interval)
    states = make_run(store, 10, np.random.default_rng(1))
    depths = _check_depths(store, interval)
    if interval == 1:
        assert set(depths) == {0}
    else:
        assert max(depths) == interval - 1, "deltas should be used up to the interval"
    check_all(store, {"r": states}, assert_same_state)


def test_deltas_make_checkpoints_small(store: Store) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(100_000).astype(np.float32)
    store.save("r", 0, {"w": w})
    w2 = w.copy()
    w2[::50] = np.nextafter(w2[::50], np.float32(1))
    info = store.save("r", 1, {"w": w2})
    assert info.stored_bytes < w.nbytes / 10
    m = store.resolve("r@1")
    assert m.objects[m.tensors["w"]["object"]].get("refs"), "expected a delta"
    assert store.load("r@1")["w"].tobytes() == w2.tobytes()


def test_object_ids_are_content_addresses() -> None:
    from ckptstore.format.tree import Leaf

    a = Leaf.from_numpy(np.arange(4, dtype=np.int32))
    b = Leaf.from_numpy(np.arange(4, dtype=np.int32).reshape(2, 2))
    c = Leaf.from_numpy(np.arange(4, dtype=np.uint32))
    assert object_id(a) == object_id(Leaf.from_numpy(np.arange(4, dtype=np.int32)))
    assert len({object_id(a), object_id(b), object_id(c)}) == 3


# ---------------------------------------------------------------------------------------------- listing
def test_checkpoints_listing(store: Store, rng: np.random.Generator) -> None:
    make_run(store, 4, rng)
    infos = store.checkpoints("r")
    assert [i.step for i in infos] == [0, 10, 20, 30]
    assert [i.metadata["epoch"] for i in infos] == [0, 1, 2, 3]
    for i in infos:
        d = i.as_dict()
        assert d["ref"] == f"r@{i.step}" and d["epoch"] == i.metadata["epoch"]
        assert d["logical_bytes"] > 0 and 0 < d["stored_bytes"] <= store.stats()["pack_bytes"]
        assert d["ratio"] == pytest.approx(d["logical_bytes"] / d["stored_bytes"], rel=1e-3)
        json.dumps(d)
    stats = store.stats()
    assert stats["checkpoints"] == 4
    assert stats["stored_bytes"] == sum(i.stored_bytes for i in infos)
    assert stats["stored_bytes"] <= stats["pack_bytes"]


def test_update_metadata_tags(store: Store, rng: np.random.Generator, assert_same_state: Any) -> None:
    states = make_run(store, 3, rng)
    store.update_metadata("r@10", lambda md: md.setdefault("tags", []).append("good"))
    assert store.resolve("r@tag:good").step == 10
    assert ckptstore.open_store(store.url).resolve("r@tag:good").step == 10
    with pytest.raises(InvalidStateError):
        store.update_metadata("r@10", lambda md: md.update(bad=float("nan")))
    assert ckptstore.open_store(store.url).resolve("r@10").metadata["tags"] == ["good"]
    check_all(store, {"r": states}, assert_same_state)


def test_loads_never_write_into_delta_bases(tmp_path: Path, rng: np.random.Generator) -> None:
    """Loading decodes each delta into its base's buffer when the base was decoded only for it. The arrays the
    store keeps (the last save's words, the previous checkpoint in ``iter_load``) must never be that buffer:
    interleave saves, random-order loads and in-order reads of large tensors (past the parallel-plane and split-decode
    thresholds) and compare every byte, including the checkpoints saved after the loads."""
    store = ckptstore.create_store(tmp_path / "s.store", keyframe_interval=4)
    w = (rng.standard_normal((1031, 1100)) * 0.05).astype(np.float32)
    states: dict[int, dict[str, np.ndarray]] = {}
    for step in range(1, 9):
        w = (w * np.float32(1 - 1e-3) + (rng.standard_normal(w.shape) * 1e-5).astype(np.float32)).astype(np.float32)
        states[step] = {"w": w.copy(), "v": (w * w).astype(np.float32)}
        store.save("r", step, states[step])
        for old in rng.permutation(list(states)):
            got = store.load(f"r@{old}", tensors="numpy")
            assert all(got[k].tobytes() == states[int(old)][k].tobytes() for k in states[int(old)]), (step, old)
    for m, state in store.iter_load("r", tensors="numpy"):
        assert all(state[k].tobytes() == states[m.step][k].tobytes() for k in state), m.step
    depths = [int(rec.get("depth", 0)) for rec in store.manifest("r", 8).objects.values()]
    assert max(depths) >= 2  # chains long enough that bases are decoded only for their delta
    assert store.verify()["ok"]


def test_a_long_run_keeps_few_manifests_parsed_and_selectors_still_see_every_checkpoint(
    tmp_path: Path, assert_same_state: Any
) -> None:
    """Reading a run in order (or listing it) used to keep every manifest parsed for the Store's life: ~1 MB of
    Python objects per checkpoint of a real model. The cache is bounded; metadata selectors need no re-parse."""
    store = ckptstore.create_store(tmp_path / "s")
    states = {}
    for s in range(1, 13):
        states[s] = {"w": np.full(64, s, dtype=np.float32), "b": np.arange(s, dtype=np.int64)}
        store.save("r", s, states[s], {"epoch": s, "metrics": {"loss": float((s - 7) ** 2)}})
    fresh = ckptstore.open_store(tmp_path / "s")
    per_manifest = len(fresh.manifest("r", 1).objects) + len(fresh.manifest("r", 1).tensors) + 1
    fresh._manifests.max_records = 3 * per_manifest
    most = 0
    for m, state in fresh.iter_load("r"):
        assert_same_state(state, states[m.step])
        most = max(most, len(fresh._manifests))
    assert most <= 3, "at most the budget stays parsed while a run is read in order"
    reads: list[str] = []
    real_read = fresh.storage.read
    fresh.storage.read = lambda key: (reads.append(key), real_read(key))[1]  # type: ignore[method-assign]
    assert fresh.resolve("r@best:metrics.loss").step == 7
    assert fresh.resolve("r@epoch=2").step == 2
    assert reads == ["runs/r/ckpt/00000000000000000007.json", "runs/r/ckpt/00000000000000000002.json"], (
        "a selector reads the metadata kept, then only the manifest it picks"
    )
    # edits and deletes of checkpoints whose manifests were dropped are seen by the next selector
    fresh.update_metadata("r@3", lambda md: md["metrics"].update(loss=-1.0))
    assert fresh.resolve("r@best:metrics.loss").step == 3
    fresh.delete(["r@3"])
    assert fresh.resolve("r@best:metrics.loss").step == 7
    assert len(fresh._manifests) <= 3


def test_tiny_tensors_decode_on_the_calling_thread_the_rest_in_the_pool(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """On pool threads tiny tensors only pass the GIL back and forth (a load of 1,032 of them: 65-75 ms there,
    35 ms on the loading thread): that thread decodes batches under 16 KB itself; larger ones still go to the pool.
    Order and bytes are unchanged."""
    state = {f"norm{i}": rng.standard_normal(8).astype(np.float32) for i in range(40)}
    state["big"] = rng.standard_normal(5 << 18).astype(np.float32)  # 5 MB: a batch of its own (over 4 MB)
    state["last"] = np.arange(5, dtype=np.int64)
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    store.save("r", 1, state)
    fresh = ckptstore.open_store(tmp_path / "s", threads=2)
    m = fresh.manifest("r", 1)
    where: dict[str, str] = {}
    real = fresh._decode_chain

    def spy(manifest: Manifest, oid: str, **kw: Any) -> Any:
        where.setdefault(oid, threading.current_thread().name)
        return real(manifest, oid, **kw)

    fresh._decode_chain = spy  # type: ignore[method-assign]
    leaves = fresh.load_leaves(m)
    assert list(leaves) == list(m.tensors), "the leaves come back in the order asked"
    for name, arr in state.items():
        assert leaves[name].data.tobytes() == np.ascontiguousarray(arr).tobytes()
    by_name = {n: where[t["object"]] for n, t in m.tensors.items()}
    assert by_name["big"].startswith("ckpt-decode")
    assert all(by_name[n] == threading.current_thread().name for n in by_name if n != "big")


def test_tiny_tensors_encode_on_the_saving_thread_and_their_errors_leave_the_store_as_it_was(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save codes tensors under 16 KB on its own thread (on pool threads they only traded the GIL), larger ones
    in the pool, and writes them into the pack in order; a failure in a tiny one is the save's failure."""
    state = {f"norm{i}": rng.standard_normal(8).astype(np.float32) for i in range(20)}
    state["big"] = rng.standard_normal(1 << 16).astype(np.float32)  # 256 KB
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    store.save("r", 1, state)
    where: dict[int, str] = {}
    real = store_module.codecs.encode

    def spy(words: np.ndarray, *a: Any, **kw: Any) -> Any:
        where[words.size] = threading.current_thread().name
        return real(words, *a, **kw)

    monkeypatch.setattr(store_module.codecs, "encode", spy)
    nxt = {k: v + np.float32(1) for k, v in state.items()}
    store.save("r", 2, nxt)
    assert where[8] == threading.current_thread().name and where[1 << 16].startswith("ckpt-encode")
    fresh = ckptstore.open_store(tmp_path / "s")
    for k, v in nxt.items():
        assert fresh.load("r@2")[k].tobytes() == v.tobytes()

    def fail_on_tiny(words: np.ndarray, *a: Any, **kw: Any) -> Any:
        if words.size == 8:
            raise RuntimeError("disk on fire")
        return real(words, *a, **kw)

    monkeypatch.setattr(store_module.codecs, "encode", fail_on_tiny)
    before = set(pack_files(store))
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.save("r", 3, {k: v + np.float32(2) for k, v in state.items()})
    assert store.steps("r") == [1, 2] and set(pack_files(store)) == before, "no checkpoint, no orphan pack"
    assert ckptstore.open_store(tmp_path / "s").verify()["ok"]


def test_a_save_hashes_small_tensors_on_its_thread_and_large_ones_in_the_pool(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing tiny tensors on pool threads cost a future each, more than the hash: the saving thread hashes those
    while the pool hashes the large ones; every tensor still gets its own content address, in order."""
    from ckptstore.format.tree import Leaf

    state = {f"norm{i}": rng.standard_normal(8).astype(np.float32) for i in range(20)}
    state["big1"] = rng.standard_normal(1 << 16).astype(np.float32)  # 256 KB
    state["big2"] = rng.standard_normal(1 << 16).astype(np.float32)
    state["step"] = np.array(3.0, dtype=np.float32)
    where: dict[int, set[str]] = {}
    real = store_module.object_id

    def spy(leaf: Any) -> str:
        where.setdefault(int(np.prod(leaf.shape)), set()).add(threading.current_thread().name)
        return real(leaf)

    monkeypatch.setattr(store_module, "object_id", spy)
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    store.save("r", 1, state)
    here = threading.current_thread().name
    assert where[8] == {here} and where[1] == {here}
    assert all(t.startswith("ckpt-hash") for t in where[1 << 16])
    m = ckptstore.open_store(tmp_path / "s").manifest("r", 1)
    for name, arr in state.items():
        assert m.tensors[name]["object"] == real(Leaf.from_numpy(arr)), name
    assert list(m.tensors) == list(state)


def test_a_parsed_manifest_keeps_one_list_per_distinct_shape_and_codec_chain(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Each JSON record had its own ``shape`` and ``codecs`` lists (a few dozen distinct ones in thousands of
    records, each tracked by the garbage collector for as long as the manifest is kept): equal ones are one
    object once a Store reads the manifest, and the checkpoint reads, edits and re-reads exactly as before."""
    state = {f"layer{i}.{p}": rng.standard_normal((8, 4) if p == "w" else 4).astype(np.float32)
             for i in range(30) for p in ("w", "b")}  # fmt: skip
    store = ckptstore.create_store(tmp_path / "s")
    store.save("r", 1, state)
    store.save("r", 2, {k: v + np.float32(1e-3) for k, v in state.items()})
    fresh = ckptstore.open_store(tmp_path / "s")
    m = fresh.manifest("r", 2)
    records = [*m.objects.values(), *m.tensors.values()]
    for field in ("shape", "codecs"):
        values = [r[field] for r in records if field in r]
        assert len({id(v) for v in values}) == len({repr(v) for v in values}) < len(values), field
    raw = json.loads((tmp_path / "s" / "runs" / "r" / "ckpt" / f"{2:020d}.json").read_bytes().decode())
    assert {o: (r["shape"], r["codecs"]) for o, r in m.objects.items()} == {
        o: (r["shape"], r["codecs"]) for o, r in raw["objects"].items()
    }, "the same values as stored"
    fresh.update_metadata("r@2", lambda md: md.update(note="x"))
    again = ckptstore.open_store(tmp_path / "s")
    assert again.manifest("r", 2).metadata["note"] == "x"
    got = again.load("r@2")
    for k, v in state.items():
        assert got[k].tobytes() == (v + np.float32(1e-3)).tobytes()
