"""A writer lock for object stores: a lock object created with a conditional put, held as a renewed lease.

Object stores have no ``flock``. The protocol (docs/remote.md):

1. **Take**: create the lock key with a conditional put (``If-None-Match: *``, which only one writer can win).
   Its body is JSON: ``owner`` (a random token), ``host``, ``pid``, ``acquired`` and ``expires`` (Unix seconds).
2. **Hold**: a background thread renews ``expires`` every ``ttl / 3`` seconds while the owner still matches.
3. **Release**: delete the key if it still names this owner.
4. **Break**: a lock whose ``expires`` lies more than ``ttl`` seconds in the past is stale (its writer died;
   the extra ``ttl`` allows for clock skew between hosts).
   A writer that finds a stale lock deletes it and tries step 1 once more (one winner again).

A lock that is live makes the second writer fail at once with :class:`StoreLockedError` (as ``flock`` does on
local disk). The lock serialises whole operations (a save, a delete, a gc); it is not what keeps a commit from
clobbering another: the manifest itself is committed with a conditional put, so even two writers that both
believe they hold the lock (a lease broken while its holder was paused) cannot both commit the same checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ckptstore.errors import ConcurrentCommitError, StoreLockedError
from ckptstore.storage.base import Storage

log = logging.getLogger("ckptstore.storage")

DEFAULT_TTL = 120.0


def _read_holder(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(storage.read(key))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        return {}  # unreadable: treat as held, with no expiry we can trust -> stale after ttl by mtime
    return data if isinstance(data, dict) else {}


class LeaseLock:
    def __init__(self, storage: Storage, key: str, *, ttl: float = DEFAULT_TTL) -> None:
        self.storage = storage
        self.key = key
        self.ttl = float(ttl)
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self, acquired: float) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired": acquired,
                "expires": now + self.ttl,
            },
            separators=(",", ":"),
        ).encode()

    def _stale(self, holder: dict[str, Any]) -> bool:
        if "owner" not in holder:  # not a lease: e.g. the empty `.lock` of local disk, copied along with a store
            return True
        now = time.time()
        expires = holder.get("expires")
        if isinstance(expires, int | float):
            return now > float(expires) + self.ttl  # a full ttl of grace for clock skew between hosts
        mtime = self.storage.mtime(self.key)
        return mtime is not None and now > mtime + 2 * self.ttl

    def acquire(self) -> None:
        acquired = time.time()
        for attempt in range(2):
            try:
                self.storage.create(self.key, self._body(acquired))
                break
            except ConcurrentCommitError:
                holder = _read_holder(self.storage, self.key)
                if holder is None:  # released between our create and our read
                    continue
                if attempt == 0 and self._stale(holder):
                    log.warning("breaking the stale lock of %s (pid %s)", holder.get("host"), holder.get("pid"))
                    self.storage.delete(self.key)
                    continue
                raise StoreLockedError(
                    self._describe(holder),
                    path=f"{self.storage.url}/{self.key}",
                    hint="wait for that writer to finish; a writer that died releases the lock when its "
                    f"lease runs out (at most {2 * self.ttl:.0f} s)",
                ) from None
        else:
            raise StoreLockedError("another writer took the lock first", path=f"{self.storage.url}/{self.key}")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, args=(acquired,), name="ckpt-lease", daemon=True)
        self._thread.start()

    def _describe(self, holder: dict[str, Any]) -> str:
        who = f"{holder.get('host', '?')} (pid {holder.get('pid', '?')})"
        expires = holder.get("expires")
        left = f", lease runs {float(expires) - time.time():.0f} s more" if isinstance(expires, int | float) else ""
        return f"another writer holds the store's lock: {who}{left}"

    def _renew(self, acquired: float) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                holder = _read_holder(self.storage, self.key)
                if holder is None or holder.get("owner") != self.owner:
                    self.lost = True
                    log.warning("lost the store lock %s (broken by another writer)", self.key)
                    return
                self.storage.write(self.key, self._body(acquired))
            except Exception as exc:  # keep trying; commits stay safe through their conditional put
                log.warning("could not renew the store lock: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            holder = _read_holder(self.storage, self.key)
            if holder is not None and holder.get("owner") == self.owner:
                self.storage.delete(self.key)


def shared_prefix(key: str) -> str:
    """Where the shared holders of ``key`` keep their leases: one object each, ``KEY.shared/OWNER``."""
    return f"{key}.shared/"


def _live(storage: Storage, key: str, ttl: float) -> dict[str, Any] | None:
    """The holder of the lease at ``key`` if it is live (present and not stale), else ``None``."""
    holder = _read_holder(storage, key)
    if holder is None or LeaseLock(storage, key, ttl=ttl)._stale(holder):
        return None
    return holder


@contextlib.contextmanager
def lease(storage: Storage, key: str, *, ttl: float = DEFAULT_TTL) -> Iterator[LeaseLock]:
    """The exclusive lease on ``key``: no other exclusive holder, and no live shared holder (step 5 below)."""
    lk = LeaseLock(storage, key, ttl=ttl)
    lk.acquire()
    try:
        # Shared holders announce themselves first and look for us second; we do the opposite (a Dekker-style
        # handshake over linearizable puts and lists): of two that race, at least one sees the other and backs off.
        for k in storage.list(shared_prefix(key)):
            holder = _live(storage, k, ttl)
            if holder is None:
                with contextlib.suppress(Exception):
                    storage.delete(k)  # a shared holder that died: its lease ran out
                continue
            raise StoreLockedError(
                f"{len(storage.list(shared_prefix(key)))} writer(s) hold shared locks under it "
                f"({holder.get('host', '?')} pid {holder.get('pid', '?')} among them)",
                path=f"{storage.url}/{key}",
                hint="wait for them to finish",
            )
        yield lk
    finally:
        lk.release()


@contextlib.contextmanager
def shared_lease(storage: Storage, key: str, *, ttl: float = DEFAULT_TTL) -> Iterator[LeaseLock]:
    """A shared lease on ``key``: a lease object of its own under :func:`shared_prefix`, taken first; then
    ``key`` must have no live exclusive holder, else the shared lease is dropped again and the call fails."""
    lk = LeaseLock(storage, shared_prefix(key) + uuid.uuid4().hex, ttl=ttl)
    lk.acquire()
    try:
        holder = _read_holder(storage, key)
        if holder is not None and LeaseLock(storage, key, ttl=ttl)._stale(holder):
            log.warning("breaking the stale lock of %s (pid %s)", holder.get("host"), holder.get("pid"))
            storage.delete(key)
            holder = None
        if holder is not None:
            raise StoreLockedError(
                lk._describe(holder).replace("the store's lock", "the store-wide lock"),
                path=f"{storage.url}/{key}",
                hint="a store-wide operation (gc, repack) is running; wait for it to finish",
            )
        yield lk
    finally:
        lk.release()
