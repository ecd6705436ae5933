"""Storage on anything fsspec speaks (``s3://``, ``gs://``, ``az://``, ``memory://`` ...). See docs/remote.md.

Object stores have no rename, so the store's commit protocol maps onto them like this:

* a pack streams into one multipart upload (S3: parts go up in parallel, each retried alone) that becomes visible
  only when it completes; an abort leaves nothing;
* the manifest is committed last with ``create``, a conditional put (S3 ``If-None-Match: *``) that fails with
  :class:`ConcurrentCommitError` when another writer committed the same checkpoint first: never a silent clobber;
* readers only follow manifests, so a pack whose save died is invisible garbage until ``gc``;
* whole operations (save, delete, gc) are serialised by a lease lock object (:mod:`ckptstore.storage.lease`).

Every request is retried with exponential backoff on transient errors (:mod:`ckptstore.storage.retry`); ranged
reads fetch only the bytes asked for (large ranges in parallel pieces) and pack ranges are kept in a bounded
local cache (:mod:`ckptstore.storage.readcache`).

Options for ckptstore itself ride along with fsspec's ``storage_options`` (``--storage-option KEY=VALUE`` on the
command line) and are taken out before fsspec sees them: ``retries``, ``backoff``, ``max_backoff``,
``concurrency``, ``part_size``, ``cache_size``, ``cache_dir``, ``lock``, ``lock_ttl``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ckptstore.errors import ConcurrentCommitError, InvalidStateError, MissingDependencyError, RemoteStorageError
from ckptstore.storage import faults
from ckptstore.storage.base import FileWriter, Storage, Writer
from ckptstore.storage.readcache import ReadCache, default_cache_root
from ckptstore.storage.retry import RetryPolicy
from ckptstore.storage.s3 import MIN_PART_SIZE, MultipartWriter, S3Client, is_s3, make_pool

T = TypeVar("T")

_INSTALL_HINTS = {
    "s3": "pip install s3fs",
    "s3a": "pip install s3fs",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
}
#: Key prefixes whose objects are written once and never changed (format §9: every pack write makes a new key),
#: so byte ranges read from them can be cached locally without asking the remote again.
IMMUTABLE_PREFIXES = ("packs/",)
_SPOOL_BYTES = 64 * 2**20


def parse_size(value: Any) -> int:
    """``123``, ``"64MiB"``, ``"2GB"``, ``"1.5G"`` -> bytes (K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(value), re.IGNORECASE)
    if not m:
        raise InvalidStateError(f"not a size: {value!r}", hint="use bytes or a unit, e.g. 64MiB, 2GB")
    num, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** "_kmgt".index(unit)) if unit else int(num)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


@dataclass
class RemoteOptions:
    """ckptstore's own options for remote stores (docs/remote.md has the table)."""

    retries: int = 6  # attempts per request, the first included
    backoff: float = 0.2  # seconds; the n-th retry waits up to backoff * 2**(n-1)
    max_backoff: float = 10.0
    concurrency: int = 8  # parallel part uploads / range downloads per store
    part_size: int = 8 * 2**20  # multipart part size (S3 minimum: 5 MiB); objects above twice this go multipart
    cache_size: int = 2 * 2**30  # local read cache bound in bytes; 0 turns the cache off
    cache_dir: str | None = None  # default $CKPTSTORE_REMOTE_CACHE or ~/.cache/ckptstore/remote
    lock: str = "lease"  # "lease": writers take the lock object; "none": rely on conditional commits only
    lock_ttl: float = 120.0  # seconds a lease lasts unless renewed

    @classmethod
    def pop_from(cls, options: dict[str, Any]) -> RemoteOptions:
        out = cls()
        for f in fields(cls):
            if f.name not in options:
                continue
            raw = options.pop(f.name)
            value: Any
            if f.name in ("part_size", "cache_size"):
                value = parse_size(raw)
            elif f.name in ("retries", "concurrency"):
                value = int(raw)
            elif f.name in ("backoff", "max_backoff", "lock_ttl"):
                value = float(raw)
            else:
                value = None if raw is None else str(raw)
            setattr(out, f.name, value)
        if out.retries < 1 or out.concurrency < 1:
            raise InvalidStateError("retries and concurrency must be at least 1")
        if out.lock not in ("lease", "none"):
            raise InvalidStateError(f"lock={out.lock!r}", hint="use lock=lease (default) or lock=none")
        return out


class _SpoolWriter(FileWriter):
    """Any fsspec filesystem: spool locally (memory, then a temp file), upload whole on commit (retried)."""

    def __init__(self, storage: FsspecStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.f = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - closed in commit/abort
        self._pos = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise ValueError("write to a committed or aborted writer")
        super().write(data)

    def commit(self) -> None:
        try:
            if self._pos <= _SPOOL_BYTES:
                self.f.seek(0)
                self.storage.write(self.key, self.f.read())
            else:
                st = self.storage

                faults.point("put", self.key)

                def upload() -> None:
                    self.f.seek(0)
                    with st.fs.open(st.path_of(self.key), "wb") as out:
                        while chunk := self.f.read(8 * 2**20):
                            out.write(chunk)

                st.call(f"uploading {self._pos} bytes", self.key, upload)
            self._done = True
        finally:
            self.f.close()

    def abort(self) -> None:
        self._done = True
        with contextlib.suppress(Exception):
            self.f.close()


class FsspecStorage(Storage):
    """A store on any fsspec URL; S3 gets conditional commits, parallel multipart uploads and lease locking."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a hard dependency
            raise MissingDependencyError("fsspec is required for remote stores") from exc
        self.options = RemoteOptions.pop_from(storage_options)
        if self.options.part_size < MIN_PART_SIZE:
            raise InvalidStateError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part)")
        protocol = url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            # No listing cache (other writers change the store), and one retry layer: ours, not botocore's and
            # s3fs's too. These options are part of fsspec's instance-cache key, so the filesystem instance we
            # get (and set ``retries`` on below) is shared only with other stores opened with the same options.
            storage_options.setdefault("use_listings_cache", False)
            config = dict(storage_options.get("config_kwargs") or {})
            config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            storage_options["config_kwargs"] = config
        try:
            fs, path = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            hint = _INSTALL_HINTS.get(protocol, f"install the fsspec implementation for {protocol!r}")
            raise MissingDependencyError(f"cannot open {url}: {exc}", hint=hint) from None
        self.fs = fs
        self.root = path.rstrip("/")
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.s3_client: S3Client | None = None
        if is_s3(fs):
            fs.retries = 1  # s3fs's own retry loop; ours (self.retry) covers every call
            self.s3_client = S3Client(fs)
        #: True where ``create`` is a single atomic conditional request; elsewhere it checks, then writes.
        self.atomic_create = self.s3_client is not None or protocol == "memory"
        self.retry = RetryPolicy(self.options.retries, self.options.backoff, self.options.max_backoff)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._prefetched: dict[tuple[str, int, int], tuple[Future[bytes], int]] = {}
        self._prefetch_lock = threading.Lock()
        self.cache: ReadCache | None = None
        # A disk cache in front of memory:// or local files would only copy bytes around.
        if self.options.cache_size > 0 and protocol not in ("memory", "file", "local"):
            endpoint = (
                (storage_options.get("client_kwargs") or {}).get("endpoint_url")
                or storage_options.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
                or ""
            )
            self.cache = ReadCache(
                self.options.cache_dir or default_cache_root(), f"{endpoint}|{self.url}", self.options.cache_size
            )
        #: requests made and payload bytes moved, for tests and benchmarks
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "retries": 0}
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def path_of(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = make_pool(self.options.concurrency)
            return self._executor

    def call(
        self, what: str, key: str, fn: Callable[[], T], on_retry: Callable[[int, BaseException], None] | None = None
    ) -> T:
        def counted(attempt: int, exc: BaseException) -> None:
            self._count("retries")
            if on_retry is not None:
                on_retry(attempt, exc)

        def once() -> T:
            self._count("requests")
            return fn()

        try:
            return self.retry.call(once, what=what, where=self._where(key), on_retry=counted)
        except OSError as exc:
            if exc.errno == errno.ENOENT and "bucket" in str(exc).lower():
                raise RemoteStorageError(
                    f"{what}: {exc}", path=self._where(key), hint="create the bucket first (or check its name)"
                ) from exc
            raise

    # ------------------------------------------------------------------ reads
    def read(self, key: str) -> bytes:
        data: bytes = self.call("reading", key, lambda: self.fs.cat_file(self.path_of(key)))
        self._count("bytes_read", len(data))
        return data

    read_uncached = read

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range {start}+{length}")
        if length == 0:
            return b""
        cacheable = self.cache is not None and key.startswith(IMMUTABLE_PREFIXES)
        if cacheable:
            assert self.cache is not None
            hit = self.cache.get(key, start, length)
            if hit is not None:
                return hit
        piece = self.options.part_size
        pending = self._take_prefetched(key, start, length)
        if pending is not None:
            data = pending
        elif length > 2 * piece:  # a large range: fetch it in parallel pieces
            offsets = range(start, start + length, piece)
            chunks = list(self.pool().map(lambda o: self._fetch(key, o, min(piece, start + length - o)), offsets))
            data = b"".join(chunks)
        else:
            data = self._fetch(key, start, length)
        if cacheable:
            assert self.cache is not None
            self.cache.put(key, start, length, data)
        return data

    # ------------------------------------------------------------------ prefetch
    @contextlib.contextmanager
    def prefetch(self, ranges: Iterable[tuple[str, int, int]]) -> Iterator[None]:
        """Fetch ``ranges`` ahead, in few requests: ranges that touch each other in a key are merged into
        segments of up to ``part_size`` bytes, fetched in parallel in the background; ``read_range`` of any of
        the ranges then waits for its segment instead of making its own request. Only the bytes asked for move
        (ranges are merged only where they are adjacent). Whatever is not read in the block is dropped at its end."""
        wanted = sorted({r for r in ranges if r[2] > 0})
        if self.cache is not None:
            cache = self.cache
            wanted = [r for r in wanted if not (r[0].startswith(IMMUTABLE_PREFIXES) and cache.contains(*r))]
        segments: list[tuple[str, int, list[tuple[int, int]]]] = []  # key, start, [(start, length)]
        for key, start, length in wanted:
            if segments:
                k, s0, parts = segments[-1]
                end = parts[-1][0] + parts[-1][1]
                if k == key and start == end and end + length - s0 <= self.options.part_size:
                    parts.append((start, length))
                    continue
            segments.append((key, start, [(start, length)]))
        mine: list[tuple[str, int, int]] = []
        with self._prefetch_lock:
            for key, s0, parts in segments:
                total = parts[-1][0] + parts[-1][1] - s0
                fut = self.pool().submit(self._fetch, key, s0, total)
                for start, length in parts:
                    if (key, start, length) not in self._prefetched:
                        self._prefetched[(key, start, length)] = (fut, start - s0)
                        mine.append((key, start, length))
        try:
            yield
        finally:
            with self._prefetch_lock:
                for r in mine:
                    entry = self._prefetched.pop(r, None)
                    if entry is not None:
                        entry[0].cancel()

    def _take_prefetched(self, key: str, start: int, length: int) -> bytes | None:
        with self._prefetch_lock:
            entry = self._prefetched.pop((key, start, length), None)
        if entry is None:
            return None
        fut, offset = entry
        try:
            segment: bytes = fut.result()
        except (EOFError, FileNotFoundError):
            return None  # a cut or missing pack: read the range alone, for an error that names the right object
        return segment[offset : offset + length]

    def _fetch(self, key: str, start: int, length: int) -> bytes:
        path = self.path_of(key)
        try:
            data: bytes = self.call(
                f"reading bytes {start}-{start + length - 1}",
                key,
                lambda: self.fs.cat_file(path, start=start, end=start + length),
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno != errno.EINVAL:
                raise
            data = b""  # 416 InvalidRange: the range starts past the end
        self._count("bytes_read", len(data))
        if len(data) != length:
            raise EOFError(f"{key}: wanted {length} bytes at {start}, got {len(data)}")
        return data

    # ------------------------------------------------------------------ writes
    def write(self, key: str, data: bytes) -> None:
        data = bytes(data)
        if self.s3_client is not None and len(data) > 2 * self.options.part_size:
            w = MultipartWriter(self, key)
            w.write(data)
            w.commit()
            return
        path = self.path_of(key)
        faults.point("put", key, data)
        if self.s3_client is not None:
            s3 = self.s3_client
            self.call(f"writing {len(data)} bytes", key, lambda: s3.put(path, data))
        else:
            self.call(f"writing {len(data)} bytes", key, lambda: self.fs.pipe_file(path, data))
        self._count("bytes_written", len(data))

    def create(self, key: str, data: bytes) -> None:
        data = bytes(data)
        if self.s3_client is not None and len(data) > 2 * self.options.part_size:
            w = MultipartWriter(self, key, exclusive=True, expect=data)
            w.write(data)
            w.commit()
            return
        path = self.path_of(key)
        faults.point("create", key, data)

        def put() -> None:
            if self.s3_client is not None:
                self.s3_client.put(path, data, exclusive=True)
            else:
                self.fs.pipe_file(path, data, mode="create")

        try:
            self.call("committing", key, put)
        except FileExistsError:
            # The key may be there because an earlier try of this very request went through and only its answer
            # was lost (we retry, and so does the HTTP client: a PUT is idempotent to it). The content tells: a
            # manifest names a pack with a random id, a lock its owner's random token.
            try:
                if self.read_uncached(key) == data:
                    return
            except FileNotFoundError:
                pass  # it was there at our put and is gone now: another writer's object (a lock), since released
            raise ConcurrentCommitError(
                "already exists", path=self._where(key), hint="another writer committed it first"
            ) from None
        self._count("bytes_written", len(data))

    def open_writer(self, key: str) -> Writer:
        if self.s3_client is not None:
            return MultipartWriter(self, key)
        return _SpoolWriter(self, key)

    # ------------------------------------------------------------------ metadata
    def _head(self, key: str) -> dict[str, Any]:
        if self.s3_client is not None:
            s3 = self.s3_client
            bucket, k = s3.split(self.path_of(key))
            out: dict[str, Any] = self.call("looking up", key, lambda: s3.call("head_object", Bucket=bucket, Key=k))
            return {"size": int(out["ContentLength"]), "mtime": out.get("LastModified")}
        info = self.call("looking up", key, lambda: self.fs.info(self.path_of(key)))
        if info.get("type") == "directory":
            raise FileNotFoundError(self._where(key))
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
        return {"size": int(info["size"]), "mtime": mtime}

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["size"])

    def mtime(self, key: str) -> float | None:
        try:
            t = self._head(key)["mtime"]
        except FileNotFoundError:
            return None
        if isinstance(t, _dt.datetime):
            return t.timestamp()
        if isinstance(t, int | float):
            return float(t)
        return None

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        base = self.path_of(prefix)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(base)
        try:
            found = self.call("listing", prefix, lambda: self.fs.find(base))
        except FileNotFoundError:
            return []
        n = len(self.root) + 1 if self.root else 0
        keys = (p[n:] for p in found if p.startswith(self.root))
        return sorted(k for k in keys if k and (not prefix or k == prefix or k.startswith(prefix + "/")))

    def abort_abandoned_uploads(self, prefix: str) -> int:
        """S3: abort the multipart uploads under ``prefix`` started more than ``2 * lock_ttl`` seconds ago (past
        which a dead writer's lease is broken too). A writer uploads a pack only while it holds a lease renewed
        every ``lock_ttl / 3``, so an upload that old belongs to a writer that died (or was paused that long)."""
        if self.s3_client is None:
            return 0
        s3 = self.s3_client
        bucket, base = s3.split(self.path_of(prefix.strip("/")))
        cutoff = _dt.datetime.now(_dt.timezone.utc).timestamp() - 2 * self.options.lock_ttl
        stale: list[tuple[str, str]] = []
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": base.rstrip("/") + "/"}
        while True:
            out = self.call("listing uploads", prefix, lambda: s3.call("list_multipart_uploads", **kw))
            for u in out.get("Uploads", []):
                started = u.get("Initiated")
                if isinstance(started, _dt.datetime) and started.timestamp() < cutoff:
                    stale.append((u["Key"], u["UploadId"]))
            if not out.get("IsTruncated"):
                break
            kw.update(KeyMarker=out.get("NextKeyMarker"), UploadIdMarker=out.get("NextUploadIdMarker"))
        for k, upload_id in stale:
            faults.point("abort", k)
            with contextlib.suppress(FileNotFoundError):
                self.call(
                    "aborting an abandoned upload",
                    prefix,
                    lambda k=k, upload_id=upload_id: s3.call(  # type: ignore[misc]
                        "abort_multipart_upload", Bucket=bucket, Key=k, UploadId=upload_id
                    ),
                )
        return len(stale)

    def delete(self, key: str) -> None:
        faults.point("delete", key)
        with contextlib.suppress(FileNotFoundError):
            self.call("deleting", key, lambda: self.fs.rm_file(self.path_of(key)))

    # ------------------------------------------------------------------ locking, closing
    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        if self.options.lock == "none":
            yield
            return
        from ckptstore.storage.lease import lease, shared_lease

        with (shared_lease if shared else lease)(self, key, ttl=self.options.lock_ttl):
            yield

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
