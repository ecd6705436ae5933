"""S3 specifics of the fsspec backend: conditional puts and a parallel multipart writer, over s3fs's client.

* ``put(key, data, exclusive=True)`` sends ``If-None-Match: *``: S3 (since 2024) and compatible servers (MinIO,
  moto, R2, recent Ceph) then refuse to replace an existing key, atomically. This is how a manifest is committed.
* :class:`MultipartWriter` streams a pack as a multipart upload: parts of ``part_size`` bytes go up in parallel
  (``concurrency`` in flight, each retried alone) while the writer keeps encoding; nothing is visible until
  ``CompleteMultipartUpload``, and an abort (or a crash: configure the bucket's lifecycle rule for incomplete
  uploads) leaves no key. An object smaller than one part is sent as one ``PutObject`` on commit.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from ckptstore.storage import faults
from ckptstore.storage.base import Writer

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor


class UploadHost(Protocol):
    """What a :class:`MultipartWriter` needs from the storage it writes for (``FsspecStorage`` on S3). A protocol,
    so this module does not import the storage that uses it."""

    url: str
    options: Any  # .part_size, .concurrency
    s3_client: S3Client | None

    def path_of(self, key: str) -> str: ...
    def call(self, what: str, key: str, fn: Callable[[], Any]) -> Any: ...
    def pool(self) -> ThreadPoolExecutor: ...
    def read_uncached(self, key: str) -> bytes: ...
    def size(self, key: str) -> int: ...
    def create(self, key: str, data: bytes) -> None: ...
    def write(self, key: str, data: bytes) -> None: ...


#: S3's own limits: parts of 5 MiB at least (but the last) and 10,000 parts at most.
MIN_PART_SIZE = 5 * 2**20
MAX_PARTS = 10_000


def is_s3(fs: Any) -> bool:
    return any(c.__name__ == "S3FileSystem" for c in type(fs).__mro__)


def part_size_for(part_number: int, base: int) -> int:
    """Part sizes double every 1,000 parts, so a stream of unknown length fits in 10,000 parts (about 2 PiB
    at the default 8 MiB base) while small uploads keep small parts."""
    return base * 2 ** ((part_number - 1) // 1000)


class S3Client:
    """The few S3 calls the backend makes, through s3fs's client (errors translated to OSError by s3fs)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    def split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def put(self, path: str, data: bytes, *, exclusive: bool = False) -> None:
        bucket, key = self.split(path)
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        self.call("put_object", Bucket=bucket, Key=key, Body=data, **extra)


class MultipartWriter(Writer):
    def __init__(self, storage: UploadHost, key: str, *, exclusive: bool = False, expect: bytes | None = None) -> None:
        self.storage = storage
        self.expect = expect  # the whole content, when known: lets a retried conditional completion check it
        self.key = key
        self.path = storage.path_of(key)
        self.exclusive = exclusive
        self.client: S3Client = storage.s3_client  # type: ignore[assignment]
        self.bucket, self.s3key = self.client.split(self.path)
        self.base = storage.options.part_size
        self.buf = bytearray()
        self._pos = 0
        self.upload_id: str | None = None
        self.parts: dict[int, str] = {}  # part number -> ETag
        self.inflight: deque[Future[None]] = deque()
        self.next_part = 1
        self._lock = threading.Lock()
        self._done = False

    @property
    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise ValueError("write to a committed or aborted writer")
        self.buf += data
        self._pos += len(data)
        while len(self.buf) >= part_size_for(self.next_part, self.base) and self.next_part < MAX_PARTS:
            size = part_size_for(self.next_part, self.base)
            chunk = bytes(self.buf[:size])
            del self.buf[:size]
            self._send_part(chunk)

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        return self.storage.call(what, self.key, fn)

    def _start(self) -> None:
        faults.point("mpu-start", self.key)
        out = self._retry(
            lambda: self.client.call("create_multipart_upload", Bucket=self.bucket, Key=self.s3key),
            "starting the multipart upload",
        )
        self.upload_id = out["UploadId"]

    def _send_part(self, chunk: bytes) -> None:
        if self.upload_id is None:
            self._start()
        n = self.next_part
        self.next_part += 1
        # Back-pressure: at most `concurrency` parts in flight, and their errors surface early.
        while len(self.inflight) >= self.storage.options.concurrency:
            self.inflight.popleft().result()
        self.inflight.append(self.storage.pool().submit(self._upload_part, n, chunk))

    def _upload_part(self, n: int, chunk: bytes) -> None:
        faults.point("part", self.key, chunk)
        out = self._retry(
            lambda: self.client.call(
                "upload_part", Bucket=self.bucket, Key=self.s3key, UploadId=self.upload_id, PartNumber=n, Body=chunk
            ),
            f"uploading part {n}",
        )
        with self._lock:
            self.parts[n] = out["ETag"]

    def commit(self) -> None:
        if self._done:
            raise ValueError("writer already committed or aborted")
        try:
            if self.upload_id is None:
                data = bytes(self.buf)
                if self.exclusive:
                    self.storage.create(self.key, data)
                else:
                    self.storage.write(self.key, data)
            else:
                if self.buf:
                    self._send_part(bytes(self.buf))
                self.buf = bytearray()
                while self.inflight:
                    self.inflight.popleft().result()
                self._complete()
            self._done = True
        except BaseException:
            self.abort()
            raise

    def _complete(self) -> None:
        parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self.parts.items())]
        extra = {"IfNoneMatch": "*"} if self.exclusive else {}
        faults.point("complete", self.key)

        def complete() -> None:
            try:
                self.client.call(
                    "complete_multipart_upload", Bucket=self.bucket, Key=self.s3key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts}, **extra,
                )  # fmt: skip
            except (FileNotFoundError, FileExistsError):
                # A repeated completion whose first try went through (its answer lost): the upload is gone, or
                # the key exists for a conditional one. Whether the object is ours, its content tells.
                if self._landed():
                    return
                raise

        try:
            self._retry(complete, "completing the multipart upload")
        except FileExistsError:
            from ckptstore.errors import ConcurrentCommitError

            raise ConcurrentCommitError(
                "already exists", path=f"{self.storage.url}/{self.key}", hint="another writer committed it first"
            ) from None
        self.upload_id = None

    def _landed(self) -> bool:
        try:
            if self.expect is not None:
                return self.storage.read_uncached(self.key) == self.expect
            return self.storage.size(self.key) == self._pos  # a pack: its key is unique to this writer
        except FileNotFoundError:
            return False

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for fut in self.inflight:
            fut.cancel()
        for fut in self.inflight:
            with contextlib.suppress(BaseException):
                fut.result()
        self.inflight.clear()
        self.buf = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            with contextlib.suppress(Exception):
                faults.point("abort", self.key)
                self._retry(
                    lambda: self.client.call(
                        "abort_multipart_upload", Bucket=self.bucket, Key=self.s3key, UploadId=upload_id
                    ),
                    "aborting the multipart upload",
                )


def make_pool(concurrency: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ckpt-s3")
