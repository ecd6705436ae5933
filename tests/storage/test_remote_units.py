"""Units of the remote backend that need no server: retry classification and backoff, sizes and options, the
bounded read cache, the lease lock (on ``memory://``, whose ``create`` is exclusive), the read-only wrapper, and
``--storage-option`` parsing."""

from __future__ import annotations

import argparse
import errno
import json
import time
import uuid
from pathlib import Path

import pytest

from ckptstore.cli.common import storage_options
from ckptstore.errors import ConcurrentCommitError, InvalidStateError, RemoteStorageError, StoreLockedError
from ckptstore.storage import LocalStorage, open_storage
from ckptstore.storage.lease import LeaseLock
from ckptstore.storage.readcache import ReadCache
from ckptstore.storage.readonly import ReadOnlyStorage, ReadOnlyStoreError
from ckptstore.storage.remote import FsspecStorage, RemoteOptions, parse_size
from ckptstore.storage.retry import RetryPolicy, is_transient


def test_transient_classification() -> None:
    boto = pytest.importorskip("botocore.exceptions")
    assert is_transient(boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(boto.ConnectionClosedError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.EIO, "unknown S3 error"))
    assert is_transient(OSError(errno.EBUSY, "SlowDown"))
    for final in (FileNotFoundError("k"), FileExistsError("k"), PermissionError("no"), EOFError(),
                  OSError(errno.EINVAL, "bad range"), ValueError("x")):  # fmt: skip
        assert not is_transient(final), final


def test_retry_policy() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("dropped")
        return "ok"

    retried: list[int] = []
    policy = RetryPolicy(attempts=5, backoff=0.001, max_backoff=0.002)
    assert policy.call(flaky, what="reading", where="s3://b/k", on_retry=lambda a, e: retried.append(a)) == "ok"
    assert len(calls) == 3 and retried == [1, 2]
    with pytest.raises(RemoteStorageError) as ei:
        RetryPolicy(attempts=2, backoff=0.001).call(lambda: (_ for _ in ()).throw(TimeoutError("slow")),
                                                    what="reading", where="s3://b/k")  # fmt: skip
    assert "failed after 2 attempts" in str(ei.value) and ei.value.path == "s3://b/k"
    with pytest.raises(FileNotFoundError):  # final errors pass through at once
        RetryPolicy(attempts=5).call(lambda: (_ for _ in ()).throw(FileNotFoundError("k")), what="r", where="w")
    with pytest.raises(RemoteStorageError) as ei:  # refused credentials: a clear error, no retries
        RetryPolicy(attempts=5).call(lambda: (_ for _ in ()).throw(PermissionError("denied")), what="r", where="w")
    assert "credentials" in (ei.value.hint or "")
    p = RetryPolicy(attempts=10, backoff=0.1, max_backoff=1.0)
    assert all(0 <= p.delay(a) <= min(1.0, 0.1 * 2 ** (a - 1)) for a in range(1, 10) for _ in range(20))


def test_sizes_and_options() -> None:
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("2GB") == 2 * 10**9 and parse_size(1234) == 1234
    assert parse_size("1.5k") == 1500 and parse_size("0") == 0
    with pytest.raises(InvalidStateError):
        parse_size("lots")
    opts = {"retries": "3", "part_size": "16MiB", "cache_size": "0", "lock": "none", "anon": True}
    ro = RemoteOptions.pop_from(opts)
    assert (ro.retries, ro.part_size, ro.cache_size, ro.lock) == (3, 16 * 2**20, 0, "none")
    assert opts == {"anon": True}, "fsspec's own options are left for fsspec"
    with pytest.raises(InvalidStateError):
        RemoteOptions.pop_from({"lock": "maybe"})
    with pytest.raises(InvalidStateError):
        FsspecStorage("memory://x", part_size="1MiB")


def test_cli_storage_options() -> None:
    ns = argparse.Namespace(storage_option=[
        "endpoint_url=http://127.0.0.1:9000", "anon=false", "client_kwargs.region_name=eu-west-1",
        "config_kwargs.s3.addressing_style=path", "retries=3", "key=12345", "part_size=16MiB", "profile=none",
    ])  # fmt: skip
    assert storage_options(ns) == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "anon": False,
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "retries": 3,
        "key": "12345",  # credentials stay strings
        "part_size": "16MiB",
        "profile": None,
    }
    with pytest.raises(SystemExit):
        storage_options(argparse.Namespace(storage_option=["novalue"]))


def test_read_cache_bound_lru_and_damage(tmp_path: Path) -> None:
    c = ReadCache(tmp_path, "ns", max_bytes=4000)
    for i in range(10):
        c.put("packs/p", i * 100, 500, bytes([i]) * 500)
        time.sleep(0.01)  # distinct mtimes: recency is the file's mtime
    assert c.nbytes <= 4000
    assert c.get("packs/p", 0, 500) is None, "the oldest entries were evicted"
    assert c.get("packs/p", 900, 500) == bytes([9]) * 500
    # a damaged entry is dropped, not returned
    entry = next(p for p in c.dir.glob("*/*") if p.read_bytes()[8:] == bytes([9]) * 500)
    entry.write_bytes(entry.read_bytes()[:8] + b"\x00" * 500)
    assert c.get("packs/p", 900, 500) is None and not entry.exists()
    c.put("packs/big", 0, 2000, b"x" * 2000)  # over a quarter of the bound: not cached
    assert c.get("packs/big", 0, 2000) is None
    c.clear()
    assert c.nbytes == 0


def test_memory_backend_caches_only_immutable_keys(tmp_path: Path) -> None:
    assert FsspecStorage(f"memory://units-{uuid.uuid4().hex}").cache is None  # pointless for memory://
    s = FsspecStorage(f"memory://units-{uuid.uuid4().hex}", cache_dir=str(tmp_path), cache_size="1MB")
    s.cache = ReadCache(tmp_path, "units", 10**6)  # as for a remote protocol
    s.write("packs/r/p.pack", b"0123456789")
    s.write("runs/r/ckpt/1.json", b"{}")
    assert s.read_range("packs/r/p.pack", 2, 3) == b"234"
    assert s.read_range("runs/r/ckpt/1.json", 0, 2) == b"{}"
    assert s.cache is not None
    reads = s.stats["bytes_read"]
    assert s.read_range("packs/r/p.pack", 2, 3) == b"234"
    assert s.stats["bytes_read"] == reads and s.cache.hits == 1
    s.read_range("runs/r/ckpt/1.json", 0, 2)
    assert s.stats["bytes_read"] == reads + 2, "manifests change in place: never cached"


def test_lease_lock_on_memory() -> None:
    url = f"memory://lease-{uuid.uuid4().hex}"
    a, b = FsspecStorage(url, cache_size=0), FsspecStorage(url, cache_size=0)
    with a.lock(".lock"):
        holder = json.loads(a.read(".lock"))
        assert {"owner", "host", "pid", "acquired", "expires"} <= set(holder)
        with pytest.raises(StoreLockedError), b.lock(".lock"):
            pass
    assert not a.exists(".lock")
    lk = LeaseLock(b, ".lock", ttl=60)
    lk.acquire()
    b.write(".lock", json.dumps({"owner": "someone-else", "expires": time.time() + 60}).encode())
    lk.release()  # not ours any more: left alone
    assert json.loads(b.read(".lock"))["owner"] == "someone-else"
    b.delete(".lock")
    b.write(".lock", b"")  # the empty flock file of local disk, copied along with a store: not a lease
    with b.lock(".lock"):
        assert "owner" in json.loads(b.read(".lock"))
    with FsspecStorage(url, lock="none").lock(".lock"), FsspecStorage(url, lock="none").lock(".lock"):
        pass  # lock=none: commits rely on the conditional put alone


def test_lock_released_between_the_conditional_put_and_the_compare_is_a_lost_race() -> None:
    """The holder releases right after our conditional put failed and before we read the key back to compare:
    ``create`` reports a lost race (which the lock retries), not ``FileNotFoundError`` (CI saw that on S3)."""
    url = f"memory://lease-race-{uuid.uuid4().hex}"
    holder, taker = FsspecStorage(url, cache_size=0), FsspecStorage(url, cache_size=0)
    held = LeaseLock(holder, ".lock", ttl=60)
    held.acquire()
    plain_read = taker.read_uncached
    released: list[str] = []

    def read_after_release(key: str) -> bytes:
        if not released:
            held.release()
            released.append(key)
        return plain_read(key)

    taker.read_uncached = read_after_release  # type: ignore[method-assign]
    with pytest.raises(ConcurrentCommitError):
        taker.create(".lock", b"mine")
    assert released == [".lock"] and not taker.exists(".lock")
    released.clear()
    held.acquire()
    with taker.lock(".lock"):  # the lock's own retry takes it once the holder is gone
        assert json.loads(taker.read(".lock"))["owner"] != held.owner
    assert released == [".lock"]


def test_read_only_wrapper(tmp_path: Path) -> None:
    inner = LocalStorage(tmp_path)
    inner.write("k", b"v")
    ro = open_storage(tmp_path, read_only=True)
    assert isinstance(ro, ReadOnlyStorage)
    assert ro.read("k") == b"v" and ro.list("") == ["k"] and ro.exists("k") and ro.size("k") == 1
    for attempt in (lambda: ro.write("k", b"x"), lambda: ro.create("n", b"x"), lambda: ro.delete("k"),
                    lambda: ro.open_writer("n")):  # fmt: skip
        with pytest.raises(ReadOnlyStoreError):
            attempt()
    with pytest.raises(PermissionError), ro.lock(".lock"):
        pass
    assert inner.read("k") == b"v" and inner.list("") == ["k"]
    assert not isinstance(open_storage(tmp_path, read_only="false"), ReadOnlyStorage)


def test_prefetch_merges_adjacent_ranges_only() -> None:
    s = FsspecStorage(f"memory://prefetch-{uuid.uuid4().hex}", cache_size=0, part_size="5MiB")
    data = bytes(range(256)) * 100
    s.write("packs/p", data)
    ranges = [("packs/p", 0, 10), ("packs/p", 10, 20), ("packs/p", 100, 5), ("packs/p", 105, 1)]
    before = s.stats["requests"]
    with s.prefetch(ranges):
        assert s.stats["requests"] - before <= 2  # two segments: [0, 30) and [100, 106), nothing in between
        for key, start, length in reversed(ranges):
            assert s.read_range(key, start, length) == data[start : start + length]
        assert s.read_range("packs/p", 50, 3) == data[50:53]  # not prefetched: read on its own
    assert s.stats["requests"] - before == 3
    assert s.stats["bytes_read"] == 10 + 20 + 5 + 1 + 3
    with s.prefetch([("packs/p", 0, 4)]):
        pass  # never read: dropped at the end of the block
    assert not s._prefetched
    with s.prefetch([("packs/missing", 0, 4)]), pytest.raises(FileNotFoundError):
        s.read_range("packs/missing", 0, 4)
