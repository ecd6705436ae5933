"""Crash sweep: run a store operation in a child process and SIGKILL it, at every write boundary (the fault points
of :mod:`ckptstore.storage.faults`) or at a random moment, then check the store from a fresh Store.

Operations (``OPS``): ``save`` (a new checkpoint), ``async`` (the same through :meth:`Store.save_async`, the
caller's tensors changed right after the call), ``delete`` (with its rebase and gc), ``thin`` (drop the optimizer of
a checkpoint, :meth:`Store.drop_parts`), ``gc`` (after a delete left a mostly-dead pack: a repack, and an orphan
pack) and ``compact`` (:meth:`Store.compact` of a run saved in the hot layout). Backends (``BACKENDS``): ``local``
disk, and ``s3``: a moto server the sweep starts, each trial in a fresh prefix, the pack of a save big enough to go
up as a multipart upload (three parts), the leases with a short ttl. A trial passes when, after the kill,

* every checkpoint the operation did not target reads back bit-exact, and the target is in its old or its new
  state, whole (a saved checkpoint absent or exact; a deleted one present and exact, or gone; a thinned one with
  or without its optimizer, the rest exact; each compacted checkpoint hot or compacted, its bytes exact);
* ``verify`` is clean once ``gc`` ran, and after ``gc`` nothing is left over: no temporary file or object, no pack
  that no manifest names, and (S3) no incomplete multipart upload. Lease objects of the killed writer are counted
  apart (``stale_leases``): they are not garbage gc may judge, and the next writer of that lock breaks them.

``benchmarks/crash_sweep.py`` runs every write point of every operation plus random kills; ``tests/testing`` a few.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptstore.errors import CheckpointNotFoundError
from ckptstore.storage.local import TMP_SUFFIX
from ckptstore.store import Store, open_store
from ckptstore.testing.bitrot import _state, build_store

__all__ = ["BACKENDS", "OPS", "S3_OPS", "CrashTrial", "Target", "base_store", "count_points", "run_trial", "sweep"]

OPS = ("save", "async", "delete", "thin", "gc", "compact")
S3_OPS = ("save", "async")
BACKENDS = ("local", "s3")
RUN = "rot"  # the dense run every op but compact works on
HOT = "hot"  # a run saved in the hot layout, for compact
NEW = 1000  # the step a save writes
BUCKET = "crash"
# seconds: a killed child's leases are stale CHILD_LEASE_TTL + CHECK_LEASE_TTL after their last renewal
CHILD_LEASE_TTL = 2.0
CHECK_LEASE_TTL = 1.0

CHILD = r"""
import json, os, signal, sys, time
from ckptstore.storage import faults
from ckptstore.testing.crash import operate
location, op, kill_at, opts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
n = [0]
def hook(point, key, data):
    n[0] += 1
    if n[0] == 1:
        print("WRITING", flush=True)
    if n[0] == kill_at:
        print("KILL", point, key, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
with faults.injected(hook):
    if kill_at < 0:
        print("READY", flush=True)
        sys.stdin.readline()
    print("START", flush=True)
    t0 = time.perf_counter()
    operate(location, op, opts)
    took = time.perf_counter() - t0
    print("DONE", flush=True)
print("POINTS", n[0], took, flush=True)
"""


def new_state(big: bool = False) -> dict[str, Any]:
    """The checkpoint a ``save``/``async`` trial writes (step 1000, after the base store's last one); ``big`` adds
    16 MB of random float32 (S3: the pack then goes up as a multipart upload of three 5 MiB parts)."""
    rng = np.random.default_rng(99)
    state = _state(rng, NEW, None)
    if big:
        state["big"] = np.random.default_rng(5).standard_normal(4_000_000, dtype=np.float32)
    return state


def operate(location: str, op: str, opts: dict[str, Any]) -> None:
    """The operation a trial runs (in the child)."""
    so = opts.get("storage_options") or {}
    st = open_store(location, storage_options=so, compaction="manual")
    if op == "save":
        st.save(RUN, NEW, new_state(bool(opts.get("big"))))
    elif op == "async":
        state = new_state(bool(opts.get("big")))
        st.save_async(RUN, NEW, state)
        print("SNAP", flush=True)
        for name in ("w1", "w2", "emb"):  # the caller's tensors change at once; the stored ones must not
            state["model"][name] += np.float32(1.0)
        if "big" in state:
            state["big"][:] = 0
        st.wait()
    elif op == "delete":
        st.delete([f"{RUN}@300"])
    elif op == "thin":
        st.drop_parts([f"{RUN}@400"], ["optimizer"])
    elif op == "gc":
        st.gc()
    elif op == "compact":
        st.compact(HOT)
    else:
        raise ValueError(op)
    st.close()


def base_store(path: Path) -> None:
    """The store every trial starts from: :func:`ckptstore.testing.bitrot.build_store`, plus work left for
    ``gc``: an orphan pack (a save killed before its manifest) and a mostly-dead pack to repack (r@600 thinned by a
    process that died before its gc); plus run ``hot``: 4 checkpoints saved in the hot layout, for ``compact``."""
    build_store(path, checkpoints=6).close()
    st = open_store(path)
    st.save(RUN, 700, _state(np.random.default_rng(7), 700, None))
    (path / st.manifest(RUN, 700).key).unlink()  # its pack is now garbage for gc; r@700 never existed for readers
    st._gc_locked = lambda **kw: 0  # type: ignore[method-assign]
    st.drop_parts([f"{RUN}@600"], ["optimizer"])
    st.close()
    hot = open_store(path, layout="hot", compaction="manual")
    rng = np.random.default_rng(11)
    prev: dict[str, np.ndarray] | None = None
    for i in range(4):
        state = _state(rng, (i + 1) * 10, prev)
        prev = state["model"]
        hot.save(HOT, (i + 1) * 10, state)
    hot.close()


def _flat(store: Store, ref: str) -> dict[str, bytes]:
    return {n: np.ascontiguousarray(lf.data).tobytes() for n, lf in store.load_leaves(store.resolve(ref)).items()}


def truth_of(base: Path) -> dict[str, dict[str, bytes]]:
    """The raw bytes of every tensor of every checkpoint in ``base``, by ref."""
    st = open_store(base)
    out = {f"{r}@{s}": _flat(st, f"{r}@{s}") for r in st.runs() for s in st.steps(r)}
    st.close()
    return out


_NEW: dict[bool, dict[str, bytes]] = {}


def _flat_new(big: bool) -> dict[str, bytes]:
    if big not in _NEW:
        from ckptstore.format import tree

        _, leaves = tree.flatten(new_state(big))
        _NEW[big] = {n: np.ascontiguousarray(lf.data).tobytes() for n, lf in leaves.items()}
    return _NEW[big]


# ---------------------------------------------------------------------------------------------- where trials run
@dataclass
class Target:
    """Where trials run: a fresh copy of the base store per trial, on local disk or in an S3 prefix."""

    backend: str
    base: Path  # the base store, built on local disk
    work: Path  # local: the trial's copy; s3: unused
    server: Any = None  # s3: the MotoS3Server
    n: int = 0  # trials so far (s3: each gets its own prefix)
    location: str = ""

    def child_options(self) -> dict[str, Any]:
        if self.backend == "local":
            return {}
        return {
            "big": True,
            "storage_options": self.server.storage_options(cache_size=0, lock_ttl=CHILD_LEASE_TTL),
        }

    def fresh(self) -> str:
        """A new copy of the base store; its location."""
        self.n += 1
        if self.backend == "local":
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.copytree(self.base, self.work)
            self.location = str(self.work)
        else:
            prefix = f"t{self.n:05d}"
            client = self.client()
            for p in sorted(self.base.rglob("*")):
                if p.is_file() and p.name != ".lock" and TMP_SUFFIX not in p.name:
                    key = f"{prefix}/{p.relative_to(self.base).as_posix()}"
                    client.put_object(Bucket=BUCKET, Key=key, Body=p.read_bytes())
            self.location = f"s3://{BUCKET}/{prefix}"
        return self.location

    def open(self) -> Store:
        """The checking Store: a fresh one (local), or one that waits out the killed child's leases (s3)."""
        if self.backend == "local":
            return open_store(self.location)
        opts = self.server.storage_options(cache_size=0, lock_ttl=CHECK_LEASE_TTL)
        return open_store(self.location, storage_options=opts, lock_wait=4 * (CHILD_LEASE_TTL + CHECK_LEASE_TTL))

    def client(self) -> Any:
        import boto3

        from ckptstore.testing.s3 import CREDENTIALS

        return boto3.client(
            "s3",
            endpoint_url=self.server.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def uploads(self) -> list[str]:
        """Incomplete multipart uploads under this trial's prefix (s3)."""
        if self.backend == "local":
            return []
        prefix = self.location.split("/", 3)[3] + "/"
        out = self.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
        return [u["Key"] for u in out.get("Uploads", [])]


@contextmanager
def target(backend: str, base: Path, work: Path) -> Iterator[Target]:
    """A :class:`Target` for ``backend``; for ``s3`` a moto server with the bucket runs while the block does."""
    if backend == "local":
        yield Target("local", base, work)
        return
    if backend != "s3":
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
    from ckptstore.testing.s3 import moto_buckets

    with moto_buckets(BUCKET) as server:
        yield Target("s3", base, work, server)


# ---------------------------------------------------------------------------------------------- one trial
def _child(tg: Target, op: str, kill_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, tg.location, op, str(kill_at), json.dumps(tg.child_options())],
        text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def count_points(tg: Target, op: str) -> tuple[int, float]:
    """How many write points ``op`` passes on a fresh copy of the base store, and how long it takes (seconds, in
    the child, from opening the store to the end)."""
    tg.fresh()
    p = _child(tg, op, 0)
    out, err = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{op} on {tg.backend} failed without a kill: {err[-2000:]}")
    n, took = out.split("POINTS")[-1].split()[:2]
    return int(n), float(took)


@dataclass
class CrashTrial:
    op: str
    backend: str
    kill: str  # "point N" or "after X s"
    killed: bool = False  # the child died by the SIGKILL
    mid_op: bool = False  # ... after the operation started and before it returned
    wrote: bool = False  # ... after its first write point
    point: str = ""  # the write point the kill came at (point kills): "create runs/rot/ckpt/1000.json"
    outcome: str = ""  # the target's state after the kill: "old", "new" (compact: "mixed" = some compacted)
    damaged: list[str] = field(default_factory=list)  # committed checkpoints lost or changed
    verify_problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # after gc: temp files/objects, orphan packs, uploads
    stale_leases: int = 0  # lease objects of the killed child left after gc (s3)
    error: str = ""  # the check itself failed

    @property
    def failures(self) -> list[str]:
        return (
            self.damaged
            + [f"verify after gc: {p}" for p in self.verify_problems[:3]]
            + [f"left after gc: {k}" for k in self.leftovers[:3]]
            + ([self.error] if self.error else [])
        )


def run_trial(
    tg: Target, op: str, truth: dict[str, dict[str, bytes]], *, kill_at: int = 0, delay: float = 0.0
) -> CrashTrial:
    """One kill: at write point ``kill_at`` (1-based), or ``delay`` seconds after the child is told to start."""
    tg.fresh()
    trial = CrashTrial(op, tg.backend, f"point {kill_at}" if kill_at else f"after {delay:.3f} s")
    if kill_at:
        p = _child(tg, op, kill_at)
        out, err = p.communicate(timeout=300)
    else:
        p = _child(tg, op, -1)
        assert p.stdout is not None and p.stdin is not None
        p.stdout.readline()  # READY: imports done, the store not yet opened
        p.stdin.write("\n")
        p.stdin.flush()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=300)
    lines = out.splitlines()
    trial.killed = p.returncode == -signal.SIGKILL
    if not trial.killed and p.returncode != 0:
        trial.error = f"the child failed on its own (rc {p.returncode}): {err.strip().splitlines()[-1:]}"
    trial.mid_op = trial.killed and "START" in lines and "DONE" not in lines
    trial.wrote = trial.killed and "WRITING" in lines
    trial.point = next((ln[5:] for ln in lines if ln.startswith("KILL ")), "")
    try:
        _check(tg, op, truth, trial)
    except Exception as exc:
        trial.error = f"checking failed: {type(exc).__name__}: {exc}"
    return trial


def _check(tg: Target, op: str, truth: dict[str, dict[str, bytes]], trial: CrashTrial) -> None:
    st = tg.open()
    big = tg.backend == "s3"
    present = {f"{r}@{s}" for r in st.runs() for s in st.steps(r)}
    compacted = 0
    for ref, want in truth.items():
        try:
            got = _flat(st, ref)
        except CheckpointNotFoundError:
            if op == "delete" and ref == f"{RUN}@300":
                trial.outcome = "new"
                continue
            trial.damaged.append(f"{ref} is gone")
            continue
        except Exception as exc:
            trial.damaged.append(f"{ref}: {type(exc).__name__}: {exc}")
            continue
        if op == "thin" and ref == f"{RUN}@400" and set(got) != set(want):
            if not all(n.startswith("optimizer/") for n in set(want) - set(got)) or set(got) - set(want):
                trial.damaged.append(f"{ref}: thinned to the wrong tensors")
            trial.outcome = "new"
            want = {n: b for n, b in want.items() if n in got}
        if got != want:
            trial.damaged.append(f"{ref}: wrong bytes in {sorted(n for n in want if got.get(n) != want[n])[:3]}")
        if op == "compact" and ref.startswith(f"{HOT}@"):
            run, step = ref.split("@")
            compacted += st.manifest(run, int(step)).data.get("layout") != "hot"
    if op in ("save", "async") and f"{RUN}@{NEW}" in present:
        try:
            if _flat(st, f"{RUN}@{NEW}") != _flat_new(big):
                trial.damaged.append("the new checkpoint is committed with wrong bytes")
            trial.outcome = "new"
        except Exception as exc:
            trial.damaged.append(f"the new checkpoint: {type(exc).__name__}: {exc}")
    extra = present - set(truth) - ({f"{RUN}@{NEW}"} if op in ("save", "async") else set())
    if extra:
        trial.damaged.append(f"checkpoints appeared from nowhere: {sorted(extra)}")
    if op == "compact":
        trial.outcome = "new" if compacted == 3 else "mixed" if compacted else "old"
    trial.outcome = trial.outcome or "old"
    st.gc()
    res = st.verify()
    if not res["ok"]:
        trial.verify_problems = [str(p) for p in res["problems"]]
    trial.leftovers, trial.stale_leases = _leftovers(tg, st)
    st.close()


def _leftovers(tg: Target, st: Store) -> tuple[list[str], int]:
    live = {rec["pack"] for r in st.runs() for s in st.steps(r) for rec in st.manifest(r, s).objects.values()}
    keys = st.storage.list("")
    if tg.backend == "local":
        keys = [str(p.relative_to(tg.work)) for p in tg.work.rglob("*") if p.is_file()]
    out = [k for k in keys if TMP_SUFFIX in k.rsplit("/", 1)[-1]]
    out += [k for k in keys if k.startswith("packs/") and k not in live and TMP_SUFFIX not in k]
    out += [f"incomplete upload {k}" for k in tg.uploads()]
    leases = [k for k in keys if k.endswith("/.lock") or k == ".lock" or ".lock.shared/" in k]
    return out, (len(leases) if tg.backend == "s3" else 0)


# ---------------------------------------------------------------------------------------------- the sweep
def sweep(
    base: Path,
    work: Path,
    *,
    ops: tuple[str, ...] = OPS,
    backend: str = "local",
    random_kills: int = 0,
    points: bool = True,
    seed: int = 0,
    every: int = 1,
    log: Callable[[CrashTrial], None] | None = None,
) -> dict[str, Any]:
    """A kill at every write point of every op in ``ops`` (each fsync, rename, link and directory sync on local
    disk; each put, conditional put, part, completion and delete on S3; every ``every``-th one only, if more than
    1), then ``random_kills`` kills at random moments of random ops. Returns the figures, per op and in all."""
    for op in ops:
        if op not in (OPS if backend == "local" else S3_OPS):
            raise ValueError(f"op {op!r} is not swept on {backend}")
    rng = random.Random(seed)
    truth = truth_of(base)
    trials: list[CrashTrial] = []
    durations: dict[str, float] = {}
    npoints: dict[str, int] = {}

    def add(t: CrashTrial) -> None:
        trials.append(t)
        if log is not None:
            log(t)

    with target(backend, base, work) as tg:
        for op in ops:
            npoints[op], durations[op] = count_points(tg, op)
            if points:
                for k in range(1, npoints[op] + 1, max(1, every)):
                    add(run_trial(tg, op, truth, kill_at=k))
        for _ in range(random_kills):
            op = rng.choice(ops)
            add(run_trial(tg, op, truth, delay=rng.uniform(0.0, 1.2 * durations[op])))
    by_op = {op: _figures([t for t in trials if t.op == op]) for op in ops}
    for op in ops:
        by_op[op].update(write_points=npoints[op], op_seconds=round(durations[op], 3))
    failed = [t for t in trials if t.failures]
    return {
        "backend": backend,
        **_figures(trials),
        "by_op": by_op,
        "failed_trials": [{"op": t.op, "kill": t.kill, "point": t.point, "failures": t.failures} for t in failed],
    }


def _figures(trials: list[CrashTrial]) -> dict[str, Any]:
    return {
        "trials": len(trials),
        "point_kills": sum(t.kill.startswith("point") for t in trials),
        "random_kills": sum(t.kill.startswith("after") for t in trials),
        "killed": sum(t.killed for t in trials),
        "mid_op": sum(t.mid_op for t in trials),
        "mid_op_after_a_write": sum(t.mid_op and t.wrote for t in trials),
        "outcomes": {o: sum(t.outcome == o for t in trials) for o in ("old", "new", "mixed")},
        "damaged": sum(bool(t.damaged) for t in trials),
        "verify_failed": sum(bool(t.verify_problems) for t in trials),
        "leftovers": sum(len(t.leftovers) for t in trials),
        "stale_leases": sum(t.stale_leases for t in trials),
        "errors": sum(bool(t.error) for t in trials),
        "failures": sum(bool(t.failures) for t in trials),
    }


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`sweep` results: one row per backend and op, and a total per backend."""
    head = (
        "| backend | op | write points | kills (at points + random) | killed mid-op (after a write) | "
        "old / new / mixed | damaged | `verify` after `gc` | left after `gc` | stale leases |"
    )
    rows = [head, "|" + "---|" * 10]
    for res in results:
        for name, f in [*res["by_op"].items(), ("**all**", res)]:
            rows.append(
                f"| {res['backend']} | {name} | {f.get('write_points', '')} | "
                f"{f['trials']} ({f['point_kills']} + {f['random_kills']}) | "
                f"{f['mid_op']} ({f['mid_op_after_a_write']}) | "
                f"{f['outcomes']['old']} / {f['outcomes']['new']} / {f['outcomes']['mixed']} | {f['damaged']} | "
                f"{'clean' if not f['verify_failed'] else str(f['verify_failed']) + ' failed'} | "
                f"{f['leftovers']} | {f['stale_leases']} |"
            )
    return "\n".join(rows)
