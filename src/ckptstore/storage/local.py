"""Local-disk storage: temp file + fsync + rename, so a crash, kill or full disk never leaves a partial key."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptstore.errors import ConcurrentCommitError, StorageWriteError, StoreLockedError
from ckptstore.storage import faults
from ckptstore.storage.base import FileWriter, Storage, Writer

TMP_SUFFIX = ".tmp-"
# Ranges at least this long are mapped by read_view instead of copied: below it the mapping costs more than a copy.
_MAP_MIN = 1 << 20
# Inside a prefetch block (a load), the ranges asked for that lie within _GAP bytes of each other in a pack are
# mapped as one segment, and reads of them take views of it: one mapping for a checkpoint's few hundred objects
# instead of a pread each (a copy of each payload, ~25 MB a checkpoint here, and a release and re-take of the GIL
# each, which a decoding thread then waits for).
_GAP = 256 << 10


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(exc: OSError, path: Path, doing: str) -> StorageWriteError:
    """One clear error for a failed write: which file, what failed, what to do."""
    code = exc.errno
    why = exc.strerror or str(exc) or type(exc).__name__
    full = code in (errno.ENOSPC, errno.EDQUOT)
    return StorageWriteError(
        f"cannot write {path.name}: {doing} failed: {why}" + (" (the disk is full)" if full else ""),
        errno=code,
        path=str(path.parent),
        hint=("free space (`ckpt gc` frees what failed writes left) and run it again; " if full else "")
        + "nothing of this write is committed and earlier checkpoints are intact",
    )


class _LocalWriter(FileWriter):
    def __init__(self, final: Path, *, exclusive: bool = False) -> None:
        self.final = final
        self.exclusive = exclusive
        self.tmp = final.with_name(f"{final.name}{TMP_SUFFIX}{uuid.uuid4().hex[:12]}")
        self._pos = 0
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            faults.point("open", str(final))
            self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise _write_error(exc, final, "creating the file") from None

    def write(self, data: bytes | memoryview) -> None:
        try:
            short = faults.point("write", str(self.final), data)
            self.f.write(data if short is None else memoryview(data)[:short])
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.final, "writing") from None
        self._pos += len(data)

    def commit(self) -> None:
        try:
            faults.point("flush", str(self.final))
            self.f.flush()
            faults.point("fsync", str(self.final))
            os.fsync(self.f.fileno())
            size = os.fstat(self.f.fileno()).st_size
            self.f.close()
            if size != self._pos:  # a short write nobody reported: never commit a cut file
                raise StorageWriteError(
                    f"cannot write {self.final.name}: {size} bytes reached the disk of {self._pos} written "
                    "(a short write)",
                    path=str(self.final.parent),
                    hint="check the disk; nothing of this write is committed and earlier checkpoints are intact",
                )
            if self.exclusive:
                try:
                    faults.point("link", str(self.final))
                    os.link(self.tmp, self.final)  # fails if the final name exists: no silent clobber
                except FileExistsError:
                    raise ConcurrentCommitError(
                        "already exists", path=str(self.final), hint="another writer committed it first"
                    ) from None
                finally:
                    self.tmp.unlink(missing_ok=True)
            else:
                faults.point("rename", str(self.final))
                os.replace(self.tmp, self.final)
        except (ConcurrentCommitError, StorageWriteError):
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.final, "committing") from None
        except BaseException:
            self.abort()
            raise
        try:
            faults.point("dirsync", str(self.final))
            _fsync_dir(self.final.parent)
        except OSError as exc:  # the file is in place; only its folder entry may not be durable yet
            raise StorageWriteError(
                f"wrote {self.final.name}, but syncing its folder failed: {exc.strerror or exc}",
                errno=exc.errno,
                path=str(self.final.parent),
                hint="the write is visible but may not survive a power loss; check the disk",
            ) from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        # Inside prefetch blocks (a load), each pack is opened once, not once per object: key -> [fd, users,
        # closing]. Packs are immutable, so a descriptor reads what the key holds for as long as it is open.
        self._fds: dict[str, list[int]] = {}
        self._scopes = 0
        # (key, start, length) -> (mapped segment, offset in it): the ranges of open prefetch blocks
        self._segments: dict[tuple[str, int, int], tuple[memoryview, int]] = {}
        self._fd_lock = threading.Lock()

    @contextlib.contextmanager
    def prefetch(self, ranges: Iterable[tuple[str, int, int]]) -> Iterator[None]:
        """Within the block, the packs read are opened once each, and the ranges that lie close together in a
        pack are mapped now, one mapping a segment (pages populated up front, as :meth:`read_view` maps a long
        range); reads of those ranges in the block take views of it. A segment past the end of its pack is left
        out: its ranges are read one by one, and the read that fails says which object it was."""
        with self._fd_lock:
            self._scopes += 1
        mine: list[tuple[str, int, int]] = []
        try:
            for key, parts in _segments(ranges) if hasattr(mmap, "MAP_SHARED") else ():
                s0 = parts[0][0]
                total = parts[-1][0] + parts[-1][1] - s0
                try:
                    with self._reading(key) as fd:
                        if os.fstat(fd).st_size < s0 + total:
                            continue
                        skip = s0 % mmap.ALLOCATIONGRANULARITY
                        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                        mm = mmap.mmap(fd, total + skip, flags=flags, prot=mmap.PROT_READ, offset=s0 - skip)
                except OSError:
                    continue
                view = memoryview(mm)  # (the mapping is released when the last view of it goes)
                with self._fd_lock:
                    for start, length in parts:
                        if (key, start, length) not in self._segments:
                            self._segments[(key, start, length)] = (view, start - s0 + skip)
                            mine.append((key, start, length))
            yield
        finally:
            with self._fd_lock:
                for r in mine:
                    self._segments.pop(r, None)
                self._scopes -= 1
                if self._scopes == 0:
                    for entry in self._fds.values():
                        entry[2] = 1
                        if entry[1] == 0:
                            os.close(entry[0])
                    self._fds = {}

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[int]:
        """A descriptor of ``key`` for one read: the prefetch block's shared one, or one of its own."""
        with self._fd_lock:
            entry = self._fds.get(key) if self._scopes else None
            if entry is not None:
                entry[1] += 1
        if entry is None:
            fd = os.open(self._path(key), os.O_RDONLY)
            with self._fd_lock:
                if self._scopes and key not in self._fds:
                    entry = self._fds[key] = [fd, 1, 0]
            if entry is None:
                try:
                    yield fd
                finally:
                    os.close(fd)
                return
        try:
            yield entry[0]
        finally:
            with self._fd_lock:
                entry[1] -= 1
                if entry[1] == 0 and entry[2]:
                    os.close(entry[0])

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        hit = self._segments.get((key, start, length))
        if hit is not None:
            return bytes(hit[0][hit[1] : hit[1] + length])
        with self._reading(key) as fd:
            data = os.pread(fd, length, start)
        if len(data) != length:
            raise EOFError(f"{key}: wanted {length} bytes at {start}, file has fewer")
        return data

    def read_view(self, key: str, start: int, length: int) -> bytes | memoryview:
        """A read-only mapping of the range (pages populated up front), or a copy for short ranges.

        Safe because packs are immutable: a key is only ever created whole (rename) or deleted (unlink), and a
        mapping of an unlinked file stays valid. The mapping is released when the last view of it goes. (A pack
        truncated in place by something outside ckptstore while a load reads it would fault the process instead of
        raising: the price of not copying.)
        """
        hit = self._segments.get((key, start, length))
        if hit is not None:
            return hit[0][hit[1] : hit[1] + length]
        if length < _MAP_MIN or not hasattr(mmap, "MAP_SHARED"):  # (Windows' mmap takes other arguments)
            return self.read_range(key, start, length)
        with self._reading(key) as fd:
            if os.fstat(fd).st_size < start + length:
                raise EOFError(f"{key}: wanted {length} bytes at {start}, file has fewer")
            skip = start % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, length + skip, flags=flags, prot=mmap.PROT_READ, offset=start - skip)
        return memoryview(mm)[skip : skip + length]

    def write(self, key: str, data: bytes) -> None:
        with self.open_writer(key) as w:
            w.write(data)
            w.commit()

    def create(self, key: str, data: bytes) -> None:
        w = _LocalWriter(self._path(key), exclusive=True)
        w.write(data)
        w.commit()

    def open_writer(self, key: str) -> Writer:
        return _LocalWriter(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def mtime(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                out.append(str(Path(dirpath, f).relative_to(self.root)).replace(os.sep, "/"))
        return sorted(out)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False) -> Iterator[None]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:  # flock: per open file, so two threads of one process exclude each other as processes do
                fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(
                        "another process is writing to this store",
                        path=str(self.root),
                        hint="wait for it to finish (saves, deletes and gc take the write lock)",
                    ) from None
                raise
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _segments(ranges: Iterable[tuple[str, int, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """The ranges grouped into segments to map whole: per key, ranges that start at most ``_GAP`` bytes after
    the one before ends (an overlapping range starts a new segment); only segments of two ranges or more (a
    range alone is read as it would be without the hint)."""
    out: list[tuple[str, list[tuple[int, int]]]] = []
    for key, start, length in sorted({r for r in ranges if r[2] > 0 and r[1] >= 0}):
        if out:
            k, parts = out[-1]
            end = parts[-1][0] + parts[-1][1]
            if k == key and end <= start <= end + _GAP:
                parts.append((start, length))
                continue
        out.append((key, [(start, length)]))
    return [(k, parts) for k, parts in out if len(parts) > 1]
