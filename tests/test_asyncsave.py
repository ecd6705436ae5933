"""Store.save_async: snapshot at call time (the caller mutates right after), reusable snapshot buffers, the pinned
path for device tensors (through its CPU fallback), back-pressure, failures raised where promised, waiting."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import asyncsave
from ckptstore.errors import (
    CheckpointExistsError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidStateError,
)

torch = pytest.importorskip("torch")


def make_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g))
    return {
        "model": model.state_dict(),
        "bf16": torch.randn(300, generator=g).to(torch.bfloat16),
        "np": np.arange(1000, dtype=np.float64) * seed,
        "opt": {"state": {0: {"step": torch.tensor(float(seed))}}, "lrs": [0.1, 0.01], "name": f"s{seed}"},
        "rng": torch.get_rng_state(),
    }


def raw(state: Any) -> Any:
    """Every tensor as bytes (bit-exact comparison), plain values as they are."""
    if isinstance(state, torch.Tensor):
        t = state.detach().contiguous()
        body = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return (t.dtype.is_floating_point, t.element_size(), tuple(t.shape), body)
    if isinstance(state, np.ndarray):  # loads as a torch tensor (tensors="torch"): the same words
        return (state.dtype.kind == "f", state.itemsize, state.shape, state.tobytes())
    if isinstance(state, dict):
        return {k: raw(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [raw(v) for v in state]
    return state


def mutate(state: dict[str, Any]) -> None:
    """What a training step does right after the save call: every tensor changes in place, plain values too."""
    with torch.no_grad():
        for t in state["model"].values():
            t.add_(1.0)
        state["bf16"].mul_(3)
        state["opt"]["state"][0]["step"] += 1
        state["rng"].bitwise_xor_(0xFF)
    state["np"] += 7
    state["opt"]["lrs"].append(0.5)
    state["opt"]["name"] = "changed"


def test_stored_checkpoint_is_the_state_at_call_time(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    wants = {}
    for step in range(1, 6):
        state = make_state(step % 2)  # alternate, so saves delta against a snapshot-buffer-backed base
        meta = {"epoch": step, "notes": "x"}
        wants[step] = raw(state)
        h = store.save_async("r", step, state, meta)
        mutate(state)
        meta["epoch"] = -1
        info = h.result()
        assert h.done() and info.step == step and info.ref == f"r@{step}"
    for step, want in wants.items():
        assert raw(store.load(f"r@{step}", tensors="torch")) == want
        assert store.manifest("r", step).metadata["epoch"] == step
    assert store.verify()["ok"]
    # 8 tensors per state; from the second save on every buffer is reused
    assert store._saver.pool.stats["allocated"] == 8
    assert store._saver.pool.stats["reused"] == 8 * 4
    store.close()


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_many", "numpy"])
def test_parallel_copy_shares_chunks_among_threads_bit_exactly(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large copies are cut into chunks that the helpers start on at once and the caller finishes with them:
    every byte still lands in its own buffer (odd sizes that end mid-chunk, small and large arrays, several
    dtypes); with one thread, or only small arrays, no helper runs. The same with the batch kernel and with the
    numpy fallback (no C kernels)."""
    if kernel and asyncsave._copy_many is None:
        pytest.skip("the C kernels were not built (optional extension)")
    if not kernel:
        monkeypatch.setattr(asyncsave, "_copy_many", None)
    rng = np.random.default_rng(0)
    sizes = [3, (4 << 20) + 7, 1, (9 << 20) // 4 + 5, 1000, (6 << 20) + 1]
    dtypes = [np.uint8, np.float32, np.bool_, np.float32, np.int64, np.uint16]
    srcs = [
        rng.integers(0, 255, n * np.dtype(d).itemsize, dtype=np.uint8).view(d)
        for n, d in zip(sizes, dtypes, strict=True)
    ]
    used: list[str] = []

    class Spy(asyncsave.ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                used.append(threading.current_thread().name)
                return fn(*args, **kwargs)

            return super().submit(run)

    for threads in (1, 2, 3):
        used.clear()
        dsts = [np.zeros_like(s) for s in srcs]
        with Spy(2, thread_name_prefix="spy") as helpers:
            copy = asyncsave.ParallelCopy(helpers, threads)
            for d, s in zip(dsts, srcs, strict=True):
                copy.add(d, s)
            copy.finish()
        assert [d.tobytes() for d in dsts] == [s.tobytes() for s in srcs]
        assert len(used) == threads - 1  # one drain per helper thread, however many large arrays
    used.clear()
    small = [(np.zeros(10), np.arange(10.0)), (np.zeros(5, np.int8), np.arange(5, dtype=np.int8))]
    with Spy(1) as helpers:
        copy = asyncsave.ParallelCopy(helpers, 2)
        for d, s in small:
            copy.add(d, s)
        copy.finish()
    assert not used and [d.tolist() for d, _ in small] == [list(range(10)), list(range(5))]


def test_a_state_refused_mid_walk_gives_back_buffers_the_helpers_were_copying(tmp_path: Path) -> None:
    """A large tensor is already being copied when the walk meets something it refuses: the save fails at the
    call, nothing is stored, and the next save reuses the buffers (never handed back while still written)."""
    store = ckptstore.create_store(tmp_path / "s", threads=2)
    big = torch.arange(3 << 20, dtype=torch.float32)
    with pytest.raises(InvalidStateError):
        store.save_async("r", 1, {"a": big, "b": big * 2, "z": object()})
    assert store.steps("r") == []
    state = {"a": big, "b": big * 2}
    store.save_async("r", 1, state).result()
    assert store._saver.pool.stats["allocated"] == 2 and store._saver.pool.stats["reused"] == 2
    got = store.load("r@1", tensors="torch")
    assert got["a"].numpy().tobytes() == big.numpy().tobytes() and torch.equal(got["b"], big * 2)
    store.close()


def test_async_saves_into_a_hot_store_with_background_compaction(tmp_path: Path) -> None:
    """The hot layout's compactor and the async worker share the store: each checkpoint is still the state at
    call time, bit-exact, and after the last save ``@latest`` reads one object per tensor."""
    path = tmp_path / "s"
    ckptstore.create_store(path, layout="hot").close()
    store = ckptstore.open_store(path)
    wants = {}
    for step in range(1, 6):
        state = make_state(step)
        wants[step] = raw(state)
        store.save_async("r", step, state)  # no result(): the next call waits (back-pressure)
        mutate(state)
    store.close()  # waits for the last save, then for the compaction
    store = ckptstore.open_store(path)
    for step, want in wants.items():
        assert raw(store.load(f"r@{step}", tensors="torch")) == want
    newest = store.manifest("r", 5)
    assert newest.data.get("layout") == "hot"
    assert all(not rec.get("refs") for rec in newest.objects.values())
    assert all(store.manifest("r", s).data.get("layout") != "hot" for s in range(1, 5))  # compacted meanwhile
    assert store.verify()["ok"]


def test_buffers_are_reused_by_dtype_and_size_and_trimmed(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    a = np.zeros(100, np.float32)
    store.save_async("r", 1, {"a": a, "b": np.ones(50, np.int64)}).result()
    held = {id(b) for stack in store._saver.pool.free.values() for b in stack}
    assert len(held) == 2 and store._saver.pool.nbytes == 400 + 400
    # "a" keeps its buffer; "b" changed size: a new buffer, and the unused old one is dropped
    store.save_async("r", 2, {"a": a + 1, "b": np.ones(60, np.int64)}).result()
    assert store._saver.pool.stats == {"allocated": 3, "reused": 1, "pinned": 0}
    now = {id(b) for stack in store._saver.pool.free.values() for b in stack}
    assert len(now & held) == 1 and store._saver.pool.nbytes == 400 + 480
    assert store.load("r@2")["b"].tolist() == [1] * 60
    assert store.load("r@1")["a"].tobytes() == np.zeros(100, np.float32).tobytes()


def test_device_tensors_take_the_pinned_path_with_a_cpu_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: pretend every torch tensor is on a device; the snapshot then goes through the pinned-buffer
    path (pin_memory when CUDA is there, ordinary memory otherwise) and the device synchronization."""
    made: list[tuple[tuple[int, ...], Any, bool]] = []
    synced: list[set[Any]] = []
    real_empty = asyncsave._pinned_empty

    def pinned_empty(shape: tuple[int, ...], dtype: Any) -> tuple[Any, bool]:
        buf, pinned = real_empty(shape, dtype)
        made.append((shape, dtype, pinned))
        return buf, pinned

    monkeypatch.setattr(asyncsave, "_on_accelerator", lambda t: True)
    monkeypatch.setattr(asyncsave, "_pinned_empty", pinned_empty)
    monkeypatch.setattr(asyncsave, "_synchronize", lambda devices: synced.append(set(devices)))
    store = ckptstore.create_store(tmp_path / "s")
    state = make_state(3)
    want = raw(state)
    h = store.save_async("r", 1, state)
    mutate(state)
    h.result()
    assert raw(store.load("r@1", tensors="torch")) == want
    n_torch = 7  # every tensor but the numpy array
    assert len(made) == n_torch and all(not pinned for _, _, pinned in made)  # no CUDA: the fallback
    assert synced == [{torch.device("cpu")}]
    assert store._saver.pool.stats["pinned"] == 0
    store.save_async("r", 2, state).result()
    assert len(made) == n_torch, "pinned buffers are reused between saves"
    assert raw(store.load("r@2", tensors="torch")) == raw(state)
    # the real helpers: without CUDA, ordinary memory and nothing to synchronize
    buf, pinned = real_empty((3,), torch.float32)
    assert buf.shape == (3,) and pinned is torch.cuda.is_available()


def test_arguments_are_checked_at_call_time_and_leave_no_trace(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    with pytest.raises(InvalidNameError):
        store.save_async("bad name!", 1, {"w": np.zeros(3)})
    with pytest.raises(InvalidNameError):
        store.save_async("r", -1, {"w": np.zeros(3)})
    with pytest.raises(InvalidNameError):
        store.save_async("r", 1, {"w/x": {"": np.zeros(3)}})
    with pytest.raises(InvalidMetadataError):
        store.save_async("r", 1, {"w": np.zeros(3)}, {"epoch": object()})
    with pytest.raises(InvalidStateError):
        store.save_async("r", 1, {"w": object()})
    assert store._saver.in_flight == 0 and store.steps("r") == []
    store.save_async("r", 1, {"w": np.zeros(3)}).result()
    with pytest.raises(CheckpointExistsError):
        store.save_async("r", 1, {"w": np.zeros(3)})
    h = store.save_async("r", 2, {"w": np.ones(3)})
    with pytest.raises(CheckpointExistsError):  # in flight counts too
        store.save_async("r", 2, {"w": np.ones(3)})
    h.result()
    assert store.steps("r") == [1, 2]


def blocking_commit() -> tuple[threading.Event, threading.Event, Any]:
    """An on_commit that holds the save in flight until released; ``entered`` is set once it runs."""
    entered, release = threading.Event(), threading.Event()

    def on_commit(info: Any) -> None:
        entered.set()
        assert release.wait(30)

    return entered, release, on_commit


def call_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc
        out["at"] = time.monotonic()

    th = threading.Thread(target=run)
    th.start()
    return th, out


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_back_pressure(tmp_path: Path, max_in_flight: int) -> None:
    store = ckptstore.create_store(tmp_path / "s", max_in_flight=max_in_flight)
    entered, release, on_commit = blocking_commit()
    first = store.save_async("r", 1, {"w": np.zeros(1000)}, on_commit=on_commit)
    assert entered.wait(30)
    handles = [first]
    for step in range(2, max_in_flight + 1):  # free slots: these return at once
        handles.append(store.save_async("r", step, {"w": np.full(1000, step)}))
    assert store._saver.in_flight == max_in_flight
    th, out = call_in_thread(lambda: store.save_async("r", 9, {"w": np.full(1000, 9.0)}))
    time.sleep(0.3)
    assert th.is_alive() and "value" not in out, "a save beyond max_in_flight must wait"
    released = time.monotonic()
    release.set()
    th.join(30)
    assert out["at"] >= released and "error" not in out
    handles.append(out["value"])
    assert [h.result().step for h in handles] == [*range(1, max_in_flight + 1), 9]
    assert store.load("r@9")["w"].tolist() == [9.0] * 1000
    store.close()


def test_background_failure_is_raised_by_result_then_not_again(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")

    def boom(info: Any) -> None:
        raise RuntimeError("callback failed")

    h = store.save_async("r", 1, {"w": np.zeros(3)}, on_commit=boom)
    with pytest.raises(RuntimeError, match="callback failed") as exc:
        h.result()
    assert any("background save of r@1" in n and "after the commit" in n for n in exc.value.__notes__)
    assert isinstance(h.exception(), RuntimeError)
    store.save("r", 2, {"w": np.ones(3)})  # reported by the handle: the next save goes on
    assert store.steps("r") == [1, 2]
    store.close()


def test_background_failure_is_raised_by_the_next_save_and_by_close(tmp_path: Path) -> None:
    """A real failure: another writer commits the same step while this save waits in the queue."""
    path = tmp_path / "s"
    store = ckptstore.create_store(path, max_in_flight=2)
    entered, release, on_commit = blocking_commit()
    store.save_async("r", 1, {"w": np.zeros(3)}, on_commit=on_commit)
    assert entered.wait(30)
    second = store.save_async("r", 2, {"w": np.ones(3)})  # queued behind the first
    other = ckptstore.open_store(path)
    other.save("r", 2, {"w": np.full(3, 2.0)})
    release.set()
    while not second.done():  # done() reports nothing: the failure is still the store's to raise
        time.sleep(0.01)
    with pytest.raises(CheckpointExistsError) as exc:
        store.save_async("r", 3, {"w": np.zeros(3)})
    assert any("background save of r@2" in n and "not saved" in n for n in exc.value.__notes__)
    assert store.load("r@2")["w"].tolist() == [2.0, 2.0, 2.0]  # the other writer's, untouched
    assert store.verify()["ok"]
    # the next failure goes to close()
    entered, release, on_commit = blocking_commit()
    store.save_async("r", 3, {"w": np.zeros(3)}, on_commit=on_commit)
    assert entered.wait(30)
    store.save_async("r", 4, {"w": np.ones(3)})
    other.save("r", 4, {"w": np.full(3, 4.0)})
    release.set()
    with pytest.raises(CheckpointExistsError):
        store.close()
    assert ckptstore.open_store(path).steps("r") == [1, 2, 3, 4]


def test_close_and_with_wait_for_pending_saves(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ckptstore.create_store(path)

    def slow(info: Any) -> None:
        time.sleep(0.3)

    big = {"w": np.random.default_rng(0).standard_normal(2_000_000)}
    with ckptstore.open_store(path) as store:
        h = store.save_async("r", 1, big, on_commit=slow)
    assert h.done() and ckptstore.open_store(path).steps("r") == [1]
    store = ckptstore.open_store(path)
    h = store.save_async("r", 2, big, on_commit=slow)
    store.close()
    assert h.done()
    fresh = ckptstore.open_store(path)
    assert fresh.steps("r") == [1, 2] and fresh.load("r@2")["w"].tobytes() == big["w"].tobytes()
    # an error in the with-body comes first; the save in flight still completes
    with pytest.raises(KeyError), ckptstore.open_store(path) as store:
        store.save_async("r", 3, big, on_commit=slow)
        raise KeyError("body")
    assert ckptstore.open_store(path).steps("r") == [1, 2, 3]


def test_reads_and_writes_wait_for_saves_in_flight(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    entered, release, on_commit = blocking_commit()
    store.save_async("r", 1, {"w": np.zeros(3)}, on_commit=on_commit)
    assert entered.wait(30)
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    assert store.steps("r") == [1]  # waited for the save (and its callback)
    assert time.monotonic() - t0 >= 0.2
    # a write from the main thread while a save is in flight waits instead of failing on the store lock
    entered, release, on_commit = blocking_commit()
    store.save_async("r", 2, {"w": np.ones(3)}, on_commit=on_commit)
    assert entered.wait(30)
    threading.Timer(0.2, release.set).start()
    store.update_metadata("r@2", lambda md: md.update(notes="after"))
    assert store.manifest("r", 2).metadata["notes"] == "after"


def test_save_async_from_the_worker_is_refused(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")

    def again(info: Any) -> None:
        store.save_async("r", 2, {"w": np.zeros(3)})

    h = store.save_async("r", 1, {"w": np.zeros(3)}, on_commit=again)
    with pytest.raises(InvalidStateError, match="background thread"):
        h.result()
    with pytest.raises(InvalidStateError):
        ckptstore.create_store(tmp_path / "t", max_in_flight=0)


def test_delta_saves_do_not_wait_on_themselves(tmp_path: Path) -> None:
    """Delta planning reads earlier manifests from the store's encode threads while the save is in flight: those
    threads must not wait for the save they are part of (a deadlock once)."""
    store = ckptstore.create_store(tmp_path / "s", threads=2, keyframe_interval=4)
    w = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    wants: dict[int, bytes] = {}

    def run() -> None:
        for i in range(6):
            w[i::5] += np.float32(1e-3)
            wants[i] = w.tobytes()
            store.save_async("r", i, {"w": w, "v": {"x": w[:1000].copy()}}).result()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(120)
    assert not th.is_alive(), "async delta saves hung"
    for i, want in wants.items():
        assert store.load(f"r@{i}")["w"].tobytes() == want
    assert any(store.manifest("r", 5).objects[o].get("refs") for o in store.manifest("r", 5).objects), "no deltas"


def _nice(thread: threading.Thread) -> int:
    import os

    assert thread.native_id is not None
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


def test_background_coding_runs_at_lower_priority_than_the_caller(tmp_path: Path) -> None:
    """An async save's worker, the pools it starts and their coding threads run at nice + BACKGROUND_NICE, so a
    training loop that keeps every core busy runs first; a sync save's coding threads keep the caller's priority."""
    import os

    from ckptstore.codecs import planes

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = min(19, base + planes.BACKGROUND_NICE)
    before = planes.coding_threads()
    planes.set_coding_threads(2)  # fresh pools, started by whoever codes first
    try:
        rng = np.random.default_rng(0)
        big = {"w": torch.from_numpy(rng.standard_normal(2_000_000).astype(np.float32))}  # 8 MB: coded on 2 threads
        with ckptstore.create_store(tmp_path / "s") as store:
            store.save("r", 1, big)
            fg = [t for t in threading.enumerate() if t.name.startswith("ckpt-planes_")]
            assert fg and all(_nice(t) == base for t in fg)
            big["w"].mul_(1.0001)
            store.save_async("r", 2, big).result()
            worker = [t for t in threading.enumerate() if t.name.startswith("ckpt-async-save")]
            bg = [t for t in threading.enumerate() if t.name.startswith("ckpt-planes-bg")]
            assert worker and all(_nice(t) == expected for t in worker)
            assert bg and all(_nice(t) == expected for t in bg)  # started by the worker's encode pool
            assert all(_nice(t) == base for t in fg)  # the foreground pool is untouched
            assert _nice(threading.current_thread()) == base
            assert store.load("r@2")["w"].numpy().tobytes() == big["w"].numpy().tobytes()
    finally:
        planes.set_coding_threads(before)
