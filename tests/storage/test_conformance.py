"""Storage conformance: what every backend must do, run against each backend.

``StorageTests`` is backend-agnostic: a backend joins by adding an entry to ``BACKENDS`` (a factory taking the
pytest ``request`` and ``tmp_path`` and returning a fresh, empty Storage), or by subclassing ``StorageTests`` and
overriding the ``storage`` fixture. For example, an S3 backend on a moto server (a session fixture)::

    def _s3(request, tmp_path):
        endpoint = request.getfixturevalue("moto_server")  # e.g. "http://127.0.0.1:5555"
        return FsspecStorage(f"s3://bucket/{uuid.uuid4().hex}", client_kwargs={"endpoint_url": endpoint})

    BACKENDS["s3"] = _s3
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptstore.errors import ConcurrentCommitError
from ckptstore.storage import LocalStorage, Storage, open_storage
from ckptstore.storage.local import TMP_SUFFIX
from ckptstore.storage.remote import FsspecStorage

StorageFactory = Callable[[pytest.FixtureRequest, Path], Storage]


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return LocalStorage(tmp_path / "root")


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return FsspecStorage(f"memory://ckpt-conformance-{uuid.uuid4().hex}")


BACKENDS: dict[str, StorageFactory] = {"local": _local, "memory": _memory}


class StorageTests:
    """Conformance tests; subclasses provide ``storage`` (a fresh, empty backend per test)."""

    @pytest.fixture
    def storage(self) -> Storage:  # pragma: no cover - always overridden
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- read / write
    def test_write_then_read(self, storage: Storage) -> None:
        storage.write("a", b"hello")
        assert storage.read("a") == b"hello"
        assert storage.exists("a")
        assert storage.size("a") == 5

    def test_write_replaces(self, storage: Storage) -> None:
        storage.write("a", b"first version, long")
        storage.write("a", b"second")
        assert storage.read("a") == b"second"
        assert storage.size("a") == 6
        assert storage.list("") == ["a"]

    def test_empty_and_binary_values(self, storage: Storage) -> None:
        storage.write("empty", b"")
        assert storage.read("empty") == b""
        assert storage.size("empty") == 0
        blob = bytes(range(256)) * 1000
        storage.write("bin", blob)
        assert storage.read("bin") == blob

    def test_nested_keys(self, storage: Storage) -> None:
        storage.write("runs/r/ckpt/000.json", b"{}")
        assert storage.read("runs/r/ckpt/000.json") == b"{}"
        assert storage.exists("runs/r/ckpt/000.json")
        assert not storage.exists("runs/r/ckpt/001.json")

    def test_read_missing(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            storage.read("missing")
        with pytest.raises(FileNotFoundError):
            storage.read("no/such/dir/key")
        assert not storage.exists("missing")

    def test_size_missing(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            storage.size("missing")

    # ---------------------------------------------------------------------------------- read_range
    def test_read_range(self, storage: Storage) -> None:
        data = bytes(range(200))
        storage.write("k", data)
        assert storage.read_range("k", 0, 200) == data
        assert storage.read_range("k", 10, 5) == data[10:15]
        assert storage.read_range("k", 199, 1) == data[199:]
        assert storage.read_range("k", 0, 0) == b""
        assert storage.read_range("k", 50, 0) == b""

    def test_read_range_past_end(self, storage: Storage) -> None:
        storage.write("k", b"0123456789")
        with pytest.raises(EOFError):
            storage.read_range("k", 5, 10)
        with pytest.raises(EOFError):
            storage.read_range("k", 10, 1)
        with pytest.raises(EOFError):
            storage.read_range("k", 100, 1)

    def test_read_view_is_read_range(self, storage: Storage) -> None:
        """``read_view`` (a mapping on local disk, for large ranges) gives the same bytes at any offset."""
        data = np.random.default_rng(0).integers(0, 256, 3 * 1024 * 1024 + 17, dtype=np.uint8).tobytes()
        storage.write("k", data)
        for start, length in [(0, len(data)), (4097, 2 * 1024 * 1024), (len(data) - 1_500_000, 1_500_000), (5, 9)]:
            view = storage.read_view("k", start, length)
            assert bytes(view) == storage.read_range("k", start, length) == data[start : start + length]
        with pytest.raises(EOFError):
            storage.read_view("k", len(data) - 1_048_576, 1_048_577)

    def test_read_range_missing(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            storage.read_range("missing", 0, 1)

    # ---------------------------------------------------------------------------------- create
    def test_create_is_exclusive(self, storage: Storage) -> None:
        storage.create("m/1.json", b"one")
        with pytest.raises(ConcurrentCommitError) as ei:
            storage.create("m/1.json", b"two")
        assert isinstance(ei.value, FileExistsError)
        assert storage.read("m/1.json") == b"one"
        assert storage.list("m") == ["m/1.json"]

    def test_create_refuses_key_made_by_write(self, storage: Storage) -> None:
        storage.write("k", b"w")
        with pytest.raises(ConcurrentCommitError):
            storage.create("k", b"c")
        assert storage.read("k") == b"w"

    def test_create_after_delete(self, storage: Storage) -> None:
        storage.create("k", b"1")
        storage.delete("k")
        storage.create("k", b"2")
        assert storage.read("k") == b"2"

    # ---------------------------------------------------------------------------------- writers
    def test_writer_commit(self, storage: Storage) -> None:
        w = storage.open_writer("packs/p.pack")
        assert w.tell == 0
        w.write(b"abc")
        w.write(memoryview(b"defg"))
        assert w.tell == 7
        w.commit()
        assert storage.read("packs/p.pack") == b"abcdefg"
        assert storage.list("packs") == ["packs/p.pack"]

    def test_writer_large_streaming(self, storage: Storage) -> None:
        chunk = bytes(range(256)) * 4096  # 1 MiB
        with storage.open_writer("big") as w:
            for i in range(6):
                w.write(chunk[i:] + chunk[:i])
            w.commit()
        assert storage.size("big") == 6 * len(chunk)
        assert storage.read_range("big", 5 * len(chunk), 8) == (chunk[5:] + chunk[:5])[:8]

    def test_writer_abort_new_key(self, storage: Storage) -> None:
        storage.write("other", b"x")
        w = storage.open_writer("packs/p.pack")
        w.write(b"partial data")
        w.abort()
        assert not storage.exists("packs/p.pack")
        assert storage.list("") == ["other"]  # no key, no temp file

    def test_writer_abort_keeps_old_value(self, storage: Storage) -> None:
        storage.write("k", b"old")
        w = storage.open_writer("k")
        w.write(b"new new new")
        w.abort()
        assert storage.read("k") == b"old"
        assert storage.list("") == ["k"]

    def test_writer_context_manager_aborts_on_error(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError), storage.open_writer("k") as w:
            w.write(b"data")
            raise RuntimeError("boom")
        assert not storage.exists("k")
        assert storage.list("") == []

    def test_writer_invisible_until_commit(self, storage: Storage) -> None:
        storage.write("k", b"old")
        w = storage.open_writer("k")
        w.write(b"new")
        w2 = storage.open_writer("fresh")
        w2.write(b"data")
        assert storage.read("k") == b"old"
        assert not storage.exists("fresh")
        assert "fresh" not in storage.list("")
        w.commit()
        w2.commit()
        assert storage.read("k") == b"new"
        assert storage.read("fresh") == b"data"
        assert storage.list("") == ["fresh", "k"]

    # ---------------------------------------------------------------------------------- list
    def test_list_recursive_sorted(self, storage: Storage) -> None:
        keys = [
            "runs/b/ckpt/2.json",
            "runs/a/ckpt/1.json",
            "packs/a/x.pack",
            "runs/a/ckpt/0.json",
            "ckptstore.json",
            "runs/a/z",
            "runs/a10/x",
            "runs/a1/ckpt/9.json",
        ]
        for k in keys:
            storage.write(k, k.encode())
        assert storage.list("") == sorted(keys)
        assert storage.list("runs") == sorted(k for k in keys if k.startswith("runs/"))
        assert storage.list("runs/") == storage.list("runs")
        assert storage.list("runs/a") == ["runs/a/ckpt/0.json", "runs/a/ckpt/1.json", "runs/a/z"]
        assert storage.list("runs/a/ckpt") == ["runs/a/ckpt/0.json", "runs/a/ckpt/1.json"]
        assert storage.list("packs") == ["packs/a/x.pack"]

    def test_list_missing_prefix(self, storage: Storage) -> None:
        assert storage.list("") == []
        assert storage.list("nothing") == []
        storage.write("a/b", b"1")
        assert storage.list("nothing/here") == []
        assert storage.list("a/b/c") == []

    def test_list_returns_keys_that_read(self, storage: Storage) -> None:
        for k in ("x", "d/y", "d/e/z"):
            storage.write(k, k.encode())
        for k in storage.list(""):
            assert storage.read(k) == k.encode()

    def test_list_after_delete(self, storage: Storage) -> None:
        storage.write("d/a", b"1")
        storage.write("d/b", b"2")
        storage.delete("d/a")
        assert storage.list("d") == ["d/b"]
        storage.delete("d/b")
        assert storage.list("d") == []
        assert storage.list("") == []

    # ---------------------------------------------------------------------------------- delete
    def test_delete(self, storage: Storage) -> None:
        storage.write("k", b"1")
        storage.delete("k")
        assert not storage.exists("k")
        with pytest.raises(FileNotFoundError):
            storage.read("k")

    def test_delete_missing_is_ok(self, storage: Storage) -> None:
        storage.delete("never-existed")
        storage.delete("no/such/dir/key")
        storage.write("k", b"1")
        storage.delete("k")
        storage.delete("k")
        assert storage.list("") == []

    # ---------------------------------------------------------------------------------- misc
    def test_url(self, storage: Storage) -> None:
        assert isinstance(storage.url, str) and storage.url

    def test_lock_can_be_taken_repeatedly(self, storage: Storage) -> None:
        with storage.lock(".lock"):
            pass
        with storage.lock(".lock"):
            storage.write("k", b"1")
        assert storage.read("k") == b"1"

    def test_mtime(self, storage: Storage) -> None:
        storage.write("k", b"1")
        t = storage.mtime("k")
        assert t is None or t > 0


@pytest.mark.parametrize("backend", list(BACKENDS))
class TestBackends(StorageTests):
    @pytest.fixture
    def storage(self, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
        s = BACKENDS[backend](request, tmp_path)
        yield s
        s.close()


# -------------------------------------------------------------------------------------------- backend specifics
def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}").url == str(tmp_path.resolve())
    assert isinstance(open_storage("memory://x"), FsspecStorage)


def test_local_read_view_outlives_the_file(tmp_path: Path) -> None:
    """A mapped range stays readable after its pack is deleted (gc may unlink a pack while a load decodes)."""
    storage = LocalStorage(tmp_path)
    data = bytes(range(256)) * 8192
    storage.write("packs/a.pack", data)
    view = storage.read_view("packs/a.pack", 100, len(data) - 100)
    assert isinstance(view, memoryview)  # mapped, not copied
    storage.delete("packs/a.pack")
    assert not (tmp_path / "packs/a.pack").exists()
    assert bytes(view) == data[100:]


def test_local_leaves_no_temp_files(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path)
    s.write("a/b", b"1")
    s.create("a/c", b"2")
    with pytest.raises(ConcurrentCommitError):
        s.create("a/c", b"3")
    w = s.open_writer("a/d")
    w.write(b"x")
    w.abort()
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(names) == ["b", "c"]
    assert not any(TMP_SUFFIX in n for n in names)


def test_local_lock_excludes_a_second_writer(tmp_path: Path) -> None:
    from ckptstore.errors import StoreLockedError

    a, b = LocalStorage(tmp_path), LocalStorage(tmp_path)
    with a.lock(".lock"), pytest.raises(StoreLockedError), b.lock(".lock"):
        pass
    with b.lock(".lock"):
        pass


def test_local_keys_stay_inside_the_root(tmp_path: Path) -> None:
    """Keys are built by the store from validated names; the storage resolves its root once."""
    s = LocalStorage(tmp_path / "root")
    assert s.root == (tmp_path / "root").resolve()
    s.write("x", b"1")
    assert (tmp_path / "root" / "x").read_bytes() == b"1"


def test_local_prefetch_opens_each_file_once_and_closes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load reads many objects of one pack: inside a prefetch block the pack is opened once (reads from several
    threads share the descriptor), outside once per read; no descriptor outlives the block."""
    import os
    import threading

    from ckptstore.storage import local

    st = LocalStorage(tmp_path)
    data = bytes(range(256)) * 4096  # 1 MiB: small reads go through pread, large ones through mmap
    st.write("packs/p", data)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *a: Any, **k: Any) -> int:
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(local.os, "open", counting_open)
    fds_before = len(os.listdir("/proc/self/fd"))
    with st.prefetch([("packs/p", 0, len(data))]):
        got: list[bytes] = [st.read_range("packs/p", 0, 10)]  # (threads racing to the first read may each open)

        def reader(i: int) -> None:
            got.append(st.read_range("packs/p", i * 1000, 1000))
            got.append(bytes(st.read_view("packs/p", i * 4096, 600_000)[:10]))

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(got) == 13 and opened.count(str(tmp_path / "packs/p")) == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before
    opened.clear()
    assert st.read_range("packs/p", 5, 3) == data[5:8] and st.read_range("packs/p", 7, 2) == data[7:9]
    assert len(opened) == 2 and len(os.listdir("/proc/self/fd")) == fds_before


def test_local_prefetch_maps_close_ranges_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a prefetch block, ranges close together in a pack are mapped as one segment and read from it
    without a system call each (a load's few hundred small objects); ranges far apart, a lone range, a range past
    the end of the pack and reads after the block go to the file as before, with the same bytes and errors."""
    import mmap
    import os

    from ckptstore.storage import local

    st = LocalStorage(tmp_path)
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    st.write("packs/p", data)
    close = [(0, 100), (100, 5000), (9000, 77), (9077, 3)]  # gaps of 0 to a few KB: one segment
    far = (2 << 20, 50)  # 2 MiB on: alone
    preads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(local.os, "pread", lambda fd, n, at: preads.append(n) or real_pread(fd, n, at))
    maps: list[int] = []
    real_mmap = mmap.mmap
    monkeypatch.setattr(local.mmap, "mmap", lambda fd, n, **k: maps.append(n) or real_mmap(fd, n, **k))
    wanted = [("packs/p", a, n) for a, n in [*close, far]] + [("packs/p", len(data) - 10, 20)]
    with st.prefetch(wanted):
        assert len(maps) == 1 and maps[0] >= 9080 and not preads  # mapped now, one segment
        for a, n in close:
            assert bytes(st.read_view("packs/p", a, n)) == data[a : a + n]
            assert st.read_range("packs/p", a, n) == data[a : a + n]
        assert not preads
        assert st.read_range("packs/p", *far) == data[far[0] : far[0] + far[1]] and preads == [50]
        with pytest.raises(EOFError):  # past the end: read alone, which says so
            st.read_range("packs/p", len(data) - 10, 20)
        assert st.read_range("packs/p", 1, 99) == data[1:100]  # not asked for: read alone
    assert not st._segments
    preads.clear()
    assert st.read_range("packs/p", 0, 100) == data[:100] and preads == [100]
    with st.prefetch([("packs/missing", 0, 4), ("packs/missing", 4, 4)]), pytest.raises(FileNotFoundError):
        st.read_range("packs/missing", 0, 4)  # a missing pack: the read names it, as without the hint


def test_local_prefetch_segments_group_by_gap() -> None:
    from ckptstore.storage.local import _GAP, _segments

    got = _segments([("a", 0, 10), ("a", 10, 10), ("a", 20 + _GAP + 1, 5), ("b", 0, 1), ("a", 0, 0), ("a", 0, 10)])
    assert got == [("a", [(0, 10), (10, 10)])]  # one range alone (b, and a's far one) or empty: left out
    assert _segments([("a", 0, 10), ("a", 5, 10)]) == []  # overlapping: each starts its own segment
    assert _segments([("a", 0, 10), ("a", 10 + _GAP, 1)]) == [("a", [(0, 10), (10 + _GAP, 1)])]
