"""I/O faults (issue 14, item 2): an ``OSError`` (EIO), ``ENOSPC`` or a silently short write injected at every
write point of a save and of a delete (``ckptstore.storage.faults``), and a real full disk (a small tmpfs):
the operation fails with one clear :class:`StorageWriteError`, the checkpoints committed before are intact
bit-exact, and ``gc`` reclaims the space the failed write used.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptstore.errors import CkptStoreError, StorageWriteError
from ckptstore.storage import faults
from ckptstore.storage.local import TMP_SUFFIX
from ckptstore.store import Store, create_store, open_store


def state(step: int, n: int = 20_000) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    base = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    return {"w": base + rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3), "b": np.arange(step, step + 9)}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_intact(store: Store, steps: list[int]) -> None:
    for s in steps:
        got = store.load(f"r@{s}")
        want = state(s)
        assert got["w"].tobytes() == want["w"].tobytes() and got["b"].tobytes() == want["b"].tobytes()


def record_points(action: Any) -> list[tuple[str, str, int]]:
    """The write points ``action`` passes: (point, key, bytes written there)."""
    seen: list[tuple[str, str, int]] = []

    def hook(point: str, key: str, data: Any) -> None:
        seen.append((point, key, 0 if data is None else memoryview(data).nbytes))

    with faults.injected(hook):
        action()
    return seen


def fault(kind: str, at: int) -> Any:
    """A hook that makes the ``at``-th write point fail with ``kind``."""
    count = [0]

    def hook(point: str, key: str, data: Any) -> int | None:
        count[0] += 1
        if count[0] != at:
            return None
        if kind == "short":
            return len(data) // 2 if data is not None else None
        code = errno.ENOSPC if kind == "enospc" else errno.EIO
        raise OSError(code, "No space left on device" if kind == "enospc" else "Input/output error")

    return hook


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A store with r@1, r@2 (the second a delta of the first)."""
    path = tmp_path / "base"
    st = create_store(path)
    st.save("r", 1, state(1))
    st.save("r", 2, state(2))
    st.close()
    return path


def fresh_copy(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / f"run-{uuid.uuid4().hex[:8]}"
    shutil.copytree(base, dst)
    return dst


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(f"*{TMP_SUFFIX}*")]


@pytest.mark.parametrize("kind", ["eio", "enospc", "short"])
def test_a_fault_at_every_write_point_of_a_save(kind: str, base: Path, tmp_path: Path) -> None:
    probe = fresh_copy(base, tmp_path)
    points = record_points(lambda: open_store(probe).save("r", 3, state(3)))
    shutil.rmtree(probe)
    assert {p for p, _, _ in points} >= {"open", "write", "flush", "fsync", "link", "dirsync"}
    targets = [i + 1 for i, (p, _, n) in enumerate(points) if kind != "short" or (p == "write" and n > 1)]
    assert targets
    for at in targets:
        root = fresh_copy(base, tmp_path)
        before = snapshot(root)
        st = open_store(root)
        committed = False
        with faults.injected(fault(kind, at)), pytest.raises(StorageWriteError) as err:
            st.save("r", 3, state(3))
        msg = str(err.value)
        assert ("\n" not in msg and "Errno" not in msg and "cannot write" in msg) or "syncing its folder" in msg
        if kind == "enospc" and points[at - 1][0] != "dirsync":
            assert "the disk is full" in msg and "ckpt gc" in msg
        committed = points[at - 1][0] == "dirsync" and points[at - 1][1].endswith(".json")
        st = open_store(root)
        assert st.steps("r") == ([1, 2, 3] if committed else [1, 2]), (kind, at, points[at - 1])
        assert_intact(st, st.steps("r"))
        st.gc()
        assert not leftovers(root), (kind, at, points[at - 1])
        if not committed:
            assert snapshot(root) == before, (kind, at, points[at - 1])  # every byte of the failed save is gone
        assert st.verify()["ok"]
        if not committed:
            st.save("r", 3, state(3))  # and the same save works once the fault is gone
            assert_intact(open_store(root), [1, 2, 3])
        shutil.rmtree(root)


@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_a_fault_at_every_write_point_of_a_delete(kind: str, base: Path, tmp_path: Path) -> None:
    """Deleting r@1 rebases r@2 (a new pack, a rewritten manifest): a fault anywhere leaves r@2 readable."""
    probe = fresh_copy(base, tmp_path)
    points = record_points(lambda: open_store(probe).delete(["r@1"]))
    shutil.rmtree(probe)
    assert len(points) >= 6
    for at in range(1, len(points) + 1):
        root = fresh_copy(base, tmp_path)
        st = open_store(root)
        with faults.injected(fault(kind, at)), pytest.raises(CkptStoreError):
            st.delete(["r@1"])
        st = open_store(root)
        assert 2 in st.steps("r"), (kind, at, points[at - 1])
        assert_intact(st, st.steps("r"))
        st.gc()
        assert not leftovers(root) and st.verify()["ok"], (kind, at, points[at - 1])
        shutil.rmtree(root)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted for this test; skipped (with the reason) where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_a_real_full_disk(small_disk: Path) -> None:
    """Keyframes of 1 MiB of noise into 3 MiB: the disk fills within a few saves."""
    st = create_store(small_disk / "s")
    rng = np.random.default_rng(0)
    saved: dict[int, bytes] = {}
    with pytest.raises(StorageWriteError) as err:
        for step in range(1, 50):
            w = rng.integers(0, 2**32, 2**18, dtype=np.uint32)  # 1 MiB that no codec can shrink
            st.save("r", step, {"w": w})
            saved[step] = w.tobytes()
    assert err.value.errno == errno.ENOSPC and "the disk is full" in str(err.value)
    assert 1 <= len(saved) < 49
    st = open_store(small_disk / "s")
    assert st.steps("r") == sorted(saved)
    for step, raw in saved.items():
        assert st.load(f"r@{step}")["w"].tobytes() == raw
    assert st.verify()["ok"]
    st.gc()
    assert not leftovers(small_disk)
    st.delete([f"r@{min(saved)}"])  # room again: the next save fits
    w = rng.integers(0, 2**32, 2**18, dtype=np.uint32)
    st.save("r", 100, {"w": w})
    assert open_store(small_disk / "s").load("r@100")["w"].tobytes() == w.tobytes()
