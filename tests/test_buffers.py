"""The buffer pool of in-order reads: a buffer comes back only once nothing but the pool holds it."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.buffers import BufferPool

U4 = np.dtype("<u4")


def lent_round(pool: BufferPool, size: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    buf = pool.take(U4, size)
    assert buf is not None
    view = pool.lend(buf)
    pool.end_round()
    return buf, view


def test_a_buffer_comes_back_when_its_view_and_all_made_from_it_are_gone() -> None:
    pool = BufferPool()
    buf, view = lent_round(pool)
    addr = buf.ctypes.data
    del buf
    t = torch.from_numpy(view.view(np.float32)).reshape(512, 512)[1:]  # a torch view of a numpy view
    del view
    again = pool.take(U4, 1 << 18)
    assert again is not None and again.ctypes.data != addr and pool.reused == 0  # still held by the tensor
    del t
    gc.collect()
    taken = pool.take(U4, 1 << 18)
    assert taken is not None and taken.ctypes.data == addr and pool.reused == 1


def test_a_buffer_whose_base_was_kept_is_never_reused() -> None:
    pool = BufferPool()
    buf, view = lent_round(pool)
    addr = buf.ctypes.data
    del buf
    base = view.base  # the caller took hold of the buffer itself
    del view
    gc.collect()
    taken = pool.take(U4, 1 << 18)
    assert taken is not None and taken.ctypes.data != addr and pool.reused == 0
    assert base is not None


def test_small_sizes_and_other_shapes_are_not_pooled() -> None:
    pool = BufferPool(min_bytes=1 << 20)
    assert pool.take(U4, 1000) is None
    buf, view = lent_round(pool)
    del buf, view
    gc.collect()
    other = pool.take(U4, (1 << 18) + 1)
    assert other is not None and pool.reused == 0
    assert pool.take(np.dtype("<u2"), 1 << 19) is not None and pool.reused == 0


def test_the_pool_keeps_at_most_twice_what_one_round_lent() -> None:
    """Returned buffers beyond two rounds' bytes go back to the allocator (an in-order read keeps at most two
    checkpoints' large tensors it is not using); small or non-flat arrays are never taken in."""
    pool = BufferPool()
    views = [pool.lend(b) for b in (pool.take(U4, 1 << 18), pool.take(U4, 1 << 18)) if b is not None]
    pool.end_round()
    assert pool.max_bytes == 4 << 20
    for _ in range(5):
        pool.give_back(np.empty(1 << 18, dtype=U4))
    assert pool._held == 4 << 20
    roomy = BufferPool()
    roomy.max_bytes = 1 << 30
    roomy.give_back(np.empty(1000, dtype=U4))
    roomy.give_back(np.empty((512, 512), dtype=U4))
    roomy.give_back(np.empty(1 << 19, dtype=U4)[::2])
    assert roomy._held == 0
    roomy.give_back(np.empty(1 << 18, dtype=U4))
    assert roomy._held == 1 << 20  # (what it does take in)
    del views


def test_a_pool_gone_lets_its_buffers_go() -> None:
    """A buffer lent by a read that has ended goes back to the allocator once its arrays are gone."""
    import weakref

    pool = BufferPool()
    buf, view = lent_round(pool)
    seen = weakref.ref(buf)
    del buf, pool
    gc.collect()
    assert seen() is not None  # the lent array still uses it
    del view
    gc.collect()
    assert seen() is None


def _states(tmp_path: Path, n: int) -> tuple[ckptstore.Store, list[dict[str, torch.Tensor]]]:
    store = ckptstore.create_store(tmp_path / "s.store", keyframe_interval=3)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5 << 18, generator=g)  # 5 MiB: decoded alone, into a pool's buffer (smaller ones go in batches)
    states = []
    for step in range(1, n + 1):
        w = w + torch.randn(w.shape, generator=g) * 1e-3
        states.append(
            {
                "w": w.clone(),
                "b": torch.full((5 << 18,), float(step)),
                "frozen": torch.ones(5 << 18),  # unchanged: each checkpoint gets a copy of the kept base
                "s": torch.arange(10.0),
            }
        )
        store.save("r", step, states[-1])
    return ckptstore.open_store(store.url), states


def test_in_order_reads_reuse_what_the_caller_let_go_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that drops each checkpoint before the next gets the next one's large tensors in the memory of the
    last one's; one that keeps them, or keeps views of them, never sees them change."""
    import ckptstore.store as store_module

    pools: list[BufferPool] = []

    class Spy(BufferPool):
        def __init__(self) -> None:
            super().__init__()
            pools.append(self)

    monkeypatch.setattr(store_module, "BufferPool", Spy)
    store, states = _states(tmp_path, 7)
    for m, state in store.iter_load("r"):
        assert all(state[k].numpy().tobytes() == states[m.step - 1][k].numpy().tobytes() for k in state)
        del state
    assert pools[-1].reused >= 3 * 5  # "w", "b" and "frozen" from the second checkpoint on (one round in flight)
    kept, views = [], []
    for _, state in store.iter_load("r"):
        kept.append(state)
        views.append(state["w"][1:].clone().numpy())
        state["b"].add_(1)  # the caller changes what it got: later checkpoints are not affected
        state["frozen"].add_(1)
    assert pools[-1].reused == 0
    for i, state in enumerate(kept):
        assert state["w"].numpy().tobytes() == states[i]["w"].numpy().tobytes()
        assert (state["b"] == float(i + 2)).all() and (state["frozen"] == 2.0).all()
    held = []
    for _, state in store.iter_load("r"):
        held.append(state["w"][3:])  # a view of the large tensor outlives the checkpoint it came from
        del state
    for i, v in enumerate(held):
        assert v.numpy().tobytes() == states[i]["w"][3:].numpy().tobytes()


def test_large_tensors_buffers_are_taken_on_the_callers_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer an in-order read takes comes from the thread that reads, not from a decode thread (whose
    allocator arena cannot reuse what the caller freed), in a load that decodes on two threads."""
    import threading

    takers: list[int] = []
    take = BufferPool.take

    def spy(self: BufferPool, dtype: np.dtype, size: int) -> np.ndarray | None:
        out = take(self, dtype, size)
        if out is not None:
            takers.append(threading.get_ident())
        return out

    monkeypatch.setattr(BufferPool, "take", spy)
    store, states = _states(tmp_path, 5)
    store = ckptstore.open_store(store.url, threads=2)
    kept = [state for _, state in store.iter_load("r")]
    assert len(takers) >= 3 * 5  # "w", "b" and "frozen" of every checkpoint
    assert set(takers) == {threading.get_ident()}
    for i, state in enumerate(kept):
        assert all(state[k].numpy().tobytes() == states[i][k].numpy().tobytes() for k in state)


def test_batched_large_tensors_buffers_are_taken_on_the_callers_thread_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors over the pool's minimum that are decoded together in one batch, one changing and one unchanged,
    read by the Store that saved them (its delta head holds the unchanged one): every buffer is still taken on
    the reading thread, and each checkpoint comes back exact."""
    import threading

    takers: list[int] = []
    take = BufferPool.take

    def spy(self: BufferPool, dtype: np.dtype, size: int) -> np.ndarray | None:
        out = take(self, dtype, size)
        if out is not None:
            takers.append(threading.get_ident())
        return out

    monkeypatch.setattr(BufferPool, "take", spy)
    store = ckptstore.create_store(tmp_path / "s.store", threads=2)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3 << 17, generator=g)  # 1.5 MiB each: two go in one batch (up to 4 MB)
    q = torch.randn(3 << 17, generator=g)
    states = []
    for step in range(1, 5):
        p = p + torch.randn(p.shape, generator=g) * 1e-3
        states.append({"p": p.clone(), "q": q.clone()})
        store.save("r", step, states[-1])
    kept = [state for _, state in store.iter_load("r")]
    assert takers and set(takers) == {threading.get_ident()}
    for i, state in enumerate(kept):
        assert all(state[k].numpy().tobytes() == states[i][k].numpy().tobytes() for k in state)


def test_an_object_two_tensors_share_is_kept_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first checkpoint's "b" and "frozen" are the same bytes, one object: the read keeps one private copy of
    it for the next checkpoint, not one per tensor."""
    import ckptstore.store as store_module

    copies: list[int] = []
    private_copy = store_module._private_copy

    def spy(words: np.ndarray, *args: object) -> np.ndarray:
        copies.append(words.nbytes)
        return private_copy(words, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_private_copy", spy)
    store, states = _states(tmp_path, 2)
    first = store.manifest("r", 1)
    assert first.tensors["b"]["object"] == first.tensors["frozen"]["object"]
    out = [state for _, state in ckptstore.open_store(store.url, threads=2).iter_load("r")]
    assert len([n for n in copies if n == 5 << 20]) == 2  # "w" and the shared object, once
    assert out[0]["b"].numpy().tobytes() == states[0]["frozen"].numpy().tobytes()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_fresh_words_are_advised_against_huge_pages() -> None:
    """numpy advises arrays of 4 MiB and more for transparent huge pages (on a fragmented machine each fault may
    compact memory first); large arrays for decoded words are advised back, small ones are left as numpy makes
    them."""
    import mmap

    from ckptstore.buffers import HUGE_BYTES, fresh_words

    def vm_flags(addr: int) -> list[str]:
        flags: list[str] = []
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
        return flags

    big = fresh_words(U4, HUGE_BYTES // 4 * 2)
    big[:] = 7  # writable, and all of it there
    assert big.size == HUGE_BYTES // 2 and (big == 7).all()
    first_page = -(-big.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    flags = vm_flags(first_page)
    assert "nh" in flags and "hg" not in flags, flags
    small = fresh_words(U4, 100)
    assert small.size == 100 and "nh" not in vm_flags(small.ctypes.data)


def test_in_order_reads_holding_the_previous_checkpoint_stay_exact(tmp_path: Path) -> None:
    """The pattern of trajectory analyses: each checkpoint compared with the one before, so two are held at a
    time while the pool and the kept bases circulate under them."""
    store, states = _states(tmp_path, 9)
    prev = None
    for m, state in store.iter_load("r"):
        if prev is not None:
            i = m.step - 2
            assert all(prev[k].numpy().tobytes() == states[i][k].numpy().tobytes() for k in prev)
        assert all(state[k].numpy().tobytes() == states[m.step - 1][k].numpy().tobytes() for k in state)
        prev = state
        del state
