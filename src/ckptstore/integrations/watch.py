"""Follow a running ``open_clip_train`` job and store each ``epoch_N.pt`` once it is completely written.

The trainer is not modified and not told anything: it writes ``checkpoints/epoch_N.pt`` with a plain
``torch.save`` (no temporary name — only ``epoch_latest.pt`` goes through ``tmp.pt`` + rename), so a file in
the folder may be half-written. A file is taken only when

1. its size and modification time are unchanged across two scans at least ``settle`` seconds apart, and
2. ``torch.load(weights_only=True)`` reads it, and it is still unchanged afterwards.

A file that does not load is left alone until it changes (a trainer killed mid-write leaves a partial file that
is never stored; when the resumed trainer writes the epoch again, the complete file is). ``epoch_latest.pt`` and
``tmp.pt`` are never touched. With ``prune`` the original is removed only after ``Store.save`` has returned —
the checkpoint is committed — and only if the file has not changed since it was read. The run's ``params.txt``
(hyper-parameters), ``results.jsonl`` (eval metrics) and ``out.log`` (training loss, learning rate, eval lines)
go into each checkpoint's metadata (``openclip.checkpoint_metadata``), with the weight path for selection
(docs/policies.md).

``Watcher.scan`` is one pass (tests drive it directly); ``Watcher.run`` loops until the training process exits
(``pid``) or nothing happened for ``idle_timeout`` seconds, then makes a last pass. ``ckpt watch`` is the CLI.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptstore.errors import CkptStoreError
from ckptstore.format import tree
from ckptstore.format.manifest import object_id
from ckptstore.integrations.openclip import (
    checkpoint_metadata,
    default_run_name,
    read_checkpoint,
    step_of,
)
from ckptstore.policy import thin
from ckptstore.policy.history import PATH_KEY
from ckptstore.policy.retention import RetentionPolicy, parse_retention
from ckptstore.store import Store
from ckptstore.util import pid_alive

__all__ = ["WatchEvent", "Watcher", "pid_alive"]

_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


@dataclass
class WatchEvent:
    """Something the watcher did or noticed. ``kind``: stored, exists, pruned, incomplete, conflict, thinned, error."""

    kind: str
    file: str
    message: str
    ref: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "file": self.file, "ref": self.ref, "message": self.message, **self.info}

    def __str__(self) -> str:
        return f"{self.kind:<10} {Path(self.file).name}: {self.message}"


@dataclass
class _Seen:
    sig: tuple[int, int]
    since: float
    scans: int = 1


class Watcher:
    """Store the ``epoch_N.pt`` files of an ``open_clip_train`` run as they are completed (module docs)."""

    def __init__(
        self,
        store: Store,
        folder: str | Path,
        *,
        run: str | None = None,
        prune: bool = False,
        settle: float = 2.0,
        keep: str | RetentionPolicy | Sequence[Any] | None = None,
        keep_weights: str | RetentionPolicy | Sequence[Any] | None = None,
        record_path: bool = True,
        on_event: Callable[[WatchEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.folder = Path(folder)
        self.run = run
        self.prune = prune
        self.settle = settle
        self.keep = parse_retention(keep) if keep is not None else []
        # with keep_weights, what only it keeps stays weights-only (docs/policies.md, weights-only tier)
        self.keep_weights = parse_retention(keep_weights) if keep_weights is not None else None
        self.record_path = record_path
        self.on_event = on_event
        self.clock = clock
        self.events: list[WatchEvent] = []
        self._seen: dict[str, _Seen] = {}
        self._failed: dict[str, tuple[int, int]] = {}
        self._done: dict[str, tuple[int, int]] = {}
        self._paths: dict[str, thin.PathTracker] = {}
        self.activity = False

    # ---------------------------------------------------------------------------------------------- scanning
    def checkpoint_dir(self) -> Path:
        sub = self.folder / "checkpoints"
        return sub if self.folder.name != "checkpoints" and sub.is_dir() else self.folder

    def _emit(self, event: WatchEvent) -> WatchEvent:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def scan(self, *, final: bool = False) -> list[WatchEvent]:
        """One pass over the folder. ``final``: the trainer is gone, so a file need not be seen twice to count as
        settled (it still has to load)."""
        self.activity = False
        d = self.checkpoint_dir()
        if not d.is_dir():
            return []
        found = []
        for f in d.iterdir():
            m = _EPOCH_RE.match(f.name)
            if m:
                found.append((int(m.group(1)), f))
        out: list[WatchEvent] = []
        now = self.clock()
        for _epoch, f in sorted(found):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if self._done.get(f.name) == sig:
                continue
            seen = self._seen.get(f.name)
            if seen is None or seen.sig != sig:
                self._seen[f.name] = seen = _Seen(sig, now)
                self.activity = True
                if not final:
                    continue
            else:
                seen.scans += 1
            if not final and (seen.scans < 2 or now - seen.since < self.settle):
                continue
            if self._failed.get(f.name) == sig:
                continue
            out.extend(self._take(f, sig))
        return out

    def _take(self, f: Path, sig: tuple[int, int]) -> list[WatchEvent]:
        try:
            ckpt = read_checkpoint(f)
        except FileNotFoundError:
            return []
        except (CkptStoreError, OSError, EOFError, RuntimeError, ValueError) as exc:
            self._failed[f.name] = sig
            return [self._emit(WatchEvent("incomplete", str(f), f"does not load ({exc}); waiting for it to change",
                                          info={"bytes": sig[0]}))]  # fmt: skip
        try:
            st = f.stat()
        except FileNotFoundError:
            return []
        if (st.st_size, st.st_mtime_ns) != sig:  # written to while we read it: look again later
            self._seen.pop(f.name, None)
            return []
        try:
            events = self._ingest(f, ckpt, sig)
        except CkptStoreError as exc:
            self._done[f.name] = sig
            return [self._emit(WatchEvent("error", str(f), f"not stored: {exc}"))]
        self._done[f.name] = sig
        self.activity = True
        return events

    # --------------------------------------------------------------------------------------------- ingesting
    def _run_name(self, f: Path) -> str:
        return self.run or default_run_name(f)

    def _metadata(self, ckpt: dict[str, Any], f: Path) -> dict[str, Any]:
        # params.txt -> hparams, results.jsonl -> metrics, out.log -> loss and wall time (openclip.py reads them)
        meta = checkpoint_metadata(ckpt, f)
        meta["save_reason"] = f"open_clip_train wrote {f.name}; stored by ckpt watch"
        return meta

    def _same(self, run: str, step: int, ckpt: dict[str, Any]) -> bool:
        _skeleton, leaves = tree.flatten(ckpt)
        m = self.store.manifest(run, step)
        if set(leaves) != set(m.tensors):
            return False
        return all(object_id(leaf) == m.tensors[n]["object"] for n, leaf in leaves.items())

    def _ingest(self, f: Path, ckpt: dict[str, Any], sig: tuple[int, int]) -> list[WatchEvent]:
        run = self._run_name(f)
        step = step_of(ckpt)
        ref = f"{run}@{step}"
        out: list[WatchEvent] = []
        if step in self.store.steps(run):
            if not self._same(run, step, ckpt):
                return [self._emit(WatchEvent("conflict", str(f), f"{ref} is already stored with other contents; "
                                              "the file is left in place", ref))]  # fmt: skip
            out.append(self._emit(WatchEvent("exists", str(f), f"already stored as {ref}", ref)))
        else:
            meta = self._metadata(ckpt, f)
            tracker = weights = record = None
            if self.record_path:
                tracker = self._paths.setdefault(run, thin.PathTracker(self.store, run))
                _skeleton, leaves = tree.flatten(ckpt)
                record, weights = tracker.measure(step, leaves)
                meta[PATH_KEY] = record
                del leaves
            info = self.store.save(run, step, ckpt, meta)
            if tracker is not None and record is not None and weights is not None:
                tracker.commit(step, record, weights)
            out.append(self._emit(WatchEvent(
                "stored", str(f), f"stored as {ref} ({_mb(info.logical_bytes)} → {_mb(info.stored_bytes)})", ref,
                {"step": step, "epoch": ckpt.get("epoch"), "logical_bytes": info.logical_bytes,
                 "stored_bytes": info.stored_bytes},
            )))  # fmt: skip
            if self.keep:
                out.extend(self._retain(run, f))
        if self.prune:
            out.extend(self._prune(f, sig, ref))
        return out

    def _prune(self, f: Path, sig: tuple[int, int], ref: str) -> list[WatchEvent]:
        try:
            st = f.stat()
        except FileNotFoundError:
            return []
        if (st.st_size, st.st_mtime_ns) != sig:
            return [self._emit(WatchEvent("changed", str(f), "changed after it was stored; not removed", ref))]
        f.unlink()
        return [self._emit(WatchEvent("pruned", str(f), f"removed (stored as {ref})", ref))]

    def _retain(self, run: str, f: Path) -> list[WatchEvent]:
        the_plan, recs = thin.plan_thin(self.store, run, self.keep, keep_weights=self.keep_weights)
        if not the_plan.drop and not the_plan.weights_only:
            return []
        res = thin.apply_plan(self.store, run, the_plan, recs)
        if not res["deleted"] and not res["weights_only"]:
            return []
        msg = f"retention removed {', '.join(res['deleted']) or 'nothing'}"
        if res["weights_only"]:
            msg += f", dropped the optimizer state of {', '.join(res['weights_only'])}"
        msg += f" (freed {_mb(res['freed_bytes'])})"
        info = {"deleted": res["deleted"], "weights_only": res["weights_only"]}
        return [self._emit(WatchEvent("thinned", str(f), msg, info=info))]

    # ------------------------------------------------------------------------------------------------ looping
    def run_until(
        self,
        *,
        poll: float = 5.0,
        pid: int | None = None,
        idle_timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> list[WatchEvent]:
        """Scan every ``poll`` seconds until the process ``pid`` has exited, or nothing new appeared for
        ``idle_timeout`` seconds, or ``stop`` is set; then make a final pass. Returns every event."""
        last_activity = self.clock()
        while True:
            self.scan()
            now = self.clock()
            if self.activity:
                last_activity = now
            if stop is not None and stop.is_set():
                break
            if pid is not None and not pid_alive(pid):
                break
            if idle_timeout is not None and now - last_activity >= idle_timeout:
                break
            if stop is not None:
                stop.wait(poll)
            else:
                time.sleep(poll)
        self.scan(final=True)
        return self.events


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
