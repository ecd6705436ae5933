"""Crash sweep: run a store operation in a child process and SIGKILL it, at every write boundary (the fault points
of :mod:`ckptstore.storage.faults`) or at a random moment, then check the store.

Operations: ``save`` (a new checkpoint), ``delete`` (with its rebase and gc), ``thin`` (drop the optimizer of a
checkpoint, :meth:`Store.drop_parts`), ``gc`` (after a delete left a mostly-dead pack: a repack). A trial passes
when, after the kill,

* every checkpoint the operation did not target reads back bit-exact, and the targeted one is in its old or its
  new state, whole (a saved checkpoint absent or exact; a deleted one present and exact, or gone; a thinned one with
  or without its optimizer, the rest exact);
* ``verify`` is clean once ``gc`` ran, and no temporary file is left after ``gc``.

``benchmarks/crash_sweep.py`` runs every boundary of every operation plus random kills; ``tests/testing`` a few.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptstore.errors import CheckpointNotFoundError
from ckptstore.storage.local import TMP_SUFFIX
from ckptstore.store import Store, open_store
from ckptstore.testing.bitrot import _state, build_store

__all__ = ["OPS", "CrashTrial", "base_store", "count_points", "run_trial"]

OPS = ("save", "delete", "thin", "gc")
RUN = "rot"

CHILD = r"""
import os, signal, sys, time
from ckptstore.storage import faults
from ckptstore.store import open_store
from ckptstore.testing.crash import operate
path, op, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = [0]
def hook(point, key, data):
    n[0] += 1
    if n[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
with faults.injected(hook):
    if kill_at < 0:
        print("READY", flush=True)
        sys.stdin.readline()
    t0 = time.perf_counter()
    operate(open_store(path), op)
print("POINTS", n[0], time.perf_counter() - t0, flush=True)
"""


def new_state() -> dict[str, Any]:
    """The checkpoint a ``save`` trial writes (step 1000, after the base store's last one)."""
    rng = np.random.default_rng(99)
    return _state(rng, 1000, None)


def operate(store: Store, op: str) -> None:
    """The operation a trial runs (in the child)."""
    if op == "save":
        store.save(RUN, 1000, new_state())
    elif op == "delete":
        store.delete([f"{RUN}@300"])
    elif op == "thin":
        store.drop_parts([f"{RUN}@400"], ["optimizer"])
    elif op == "gc":
        store.gc()
    else:
        raise ValueError(op)


def base_store(path: Path) -> None:
    """The store every trial starts from: :func:`ckptstore.testing.bitrot.build_store`, plus work left for
    ``gc``: an orphan pack (a save killed before its manifest) and a mostly-dead pack to repack (r@600 thinned by a
    process that died before its gc)."""
    build_store(path, checkpoints=6).close()
    st = open_store(path)
    st.save(RUN, 700, _state(np.random.default_rng(7), 700, None))
    (path / st.manifest(RUN, 700).key).unlink()  # its pack is now garbage for gc; r@700 never existed for readers
    st._gc_locked = lambda **kw: 0  # type: ignore[method-assign]
    st.drop_parts([f"{RUN}@600"], ["optimizer"])
    st.close()


def _flat(store: Store, ref: str) -> dict[str, bytes]:
    return {n: np.ascontiguousarray(lf.data).tobytes() for n, lf in store.load_leaves(store.resolve(ref)).items()}


def _child(path: Path, op: str, kill_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), op, str(kill_at)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def count_points(base: Path, work: Path, op: str) -> tuple[int, float]:
    """How many write points ``op`` passes on a copy of ``base``, and how long it takes (seconds, in the child)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    p = _child(work, op, 0)
    out, err = p.communicate(timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{op} failed without a kill: {err[-2000:]}")
    n, took = out.split("POINTS")[-1].split()[:2]
    return int(n), float(took)


@dataclass
class CrashTrial:
    op: str
    kill: str  # "point N (name)" or "after X s"
    killed: bool
    outcome: str = ""  # "old" / "new": which state the target was found in
    failures: list[str] = field(default_factory=list)


def run_trial(
    base: Path, work: Path, op: str, truth: dict[str, dict[str, bytes]], *, kill_at: int = 0, delay: float = 0.0
) -> CrashTrial:
    """One kill: at write point ``kill_at`` (1-based), or ``delay`` seconds after the child is ready."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    trial = CrashTrial(op, f"point {kill_at}" if kill_at else f"after {delay:.3f} s", killed=False)
    if kill_at:
        p = _child(work, op, kill_at)
        p.communicate(timeout=300)
    else:
        p = _child(work, op, -1)
        assert p.stdout is not None and p.stdin is not None
        p.stdout.readline()  # READY: imports done, the store not yet opened
        p.stdin.write("\n")
        p.stdin.flush()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=300)
    trial.killed = p.returncode == -signal.SIGKILL
    _check(work, op, truth, trial)
    return trial


def _check(path: Path, op: str, truth: dict[str, dict[str, bytes]], trial: CrashTrial) -> None:
    st = open_store(path)
    steps = st.steps(RUN)
    want_steps = sorted(int(r.split("@")[1]) for r in truth)
    for ref, want in truth.items():
        step = int(ref.split("@")[1])
        try:
            got = _flat(st, ref)
        except CheckpointNotFoundError:
            if op == "delete" and step == 300:
                trial.outcome = "new"
                continue
            trial.failures.append(f"{ref} is gone")
            continue
        except Exception as exc:
            trial.failures.append(f"{ref}: {type(exc).__name__}: {exc}")
            continue
        if op == "thin" and step == 400 and set(got) != set(want):
            if not all(n.startswith("optimizer/") for n in set(want) - set(got)) or set(got) - set(want):
                trial.failures.append(f"{ref}: thinned to the wrong tensors")
            trial.outcome = "new"
            want = {n: b for n, b in want.items() if n in got}
        if got != want:
            trial.failures.append(f"{ref}: wrong bytes in {sorted(n for n in want if got.get(n) != want[n])[:3]}")
    if op == "save" and 1000 in steps:
        try:
            if _flat(st, f"{RUN}@1000") != _flat_new():
                trial.failures.append("the new checkpoint is committed with wrong bytes")
            trial.outcome = "new"
        except Exception as exc:
            trial.failures.append(f"the new checkpoint: {type(exc).__name__}: {exc}")
    extra = set(steps) - set(want_steps) - ({1000} if op == "save" else set())
    if extra:
        trial.failures.append(f"checkpoints appeared from nowhere: {sorted(extra)}")
    trial.outcome = trial.outcome or "old"
    st.gc()
    res = st.verify()
    if not res["ok"]:
        trial.failures.append(f"verify after gc: {res['problems'][:2]}")
    left = [str(p.relative_to(path)) for p in path.rglob(f"*{TMP_SUFFIX}*")]
    if left:
        trial.failures.append(f"temp files after gc: {left[:3]}")
    st.close()


_NEW: dict[str, bytes] | None = None


def _flat_new() -> dict[str, bytes]:
    global _NEW
    if _NEW is None:
        from ckptstore.format import tree

        _, leaves = tree.flatten(new_state())
        _NEW = {n: np.ascontiguousarray(lf.data).tobytes() for n, lf in leaves.items()}
    return _NEW


def truth_of(base: Path) -> dict[str, dict[str, bytes]]:
    st = open_store(base)
    out = {f"{RUN}@{s}": _flat(st, f"{RUN}@{s}") for s in st.steps(RUN)}
    st.close()
    return out


def sweep(
    base: Path, work: Path, *, random_kills: int = 0, seed: int = 0, ops: tuple[str, ...] = OPS
) -> dict[str, Any]:
    """A kill at every write point of every op (each fsync, rename, link and directory sync among them), then
    ``random_kills`` kills at random moments of random ops. Returns the figures."""
    rng = random.Random(seed)
    truth = truth_of(base)
    trials: list[CrashTrial] = []
    durations: dict[str, float] = {}
    points: dict[str, int] = {}
    for op in ops:
        n, took = count_points(base, work, op)
        points[op], durations[op] = n, took
        trials += [run_trial(base, work, op, truth, kill_at=k) for k in range(1, n + 1)]
    for _ in range(random_kills):
        op = rng.choice(ops)
        trials.append(run_trial(base, work, op, truth, delay=rng.uniform(0.0, 1.2 * durations[op])))
    failed = [t for t in trials if t.failures]
    return {
        "trials": len(trials),
        "killed": sum(t.killed for t in trials),
        "write_points": points,
        "op_seconds": {op: round(t, 3) for op, t in durations.items()},
        "by_op": {op: sum(t.op == op for t in trials) for op in ops},
        "outcomes": {o: sum(t.outcome == o for t in trials) for o in ("old", "new")},
        "failures": len(failed),
        "failed_trials": [{"op": t.op, "kill": t.kill, "failures": t.failures} for t in failed],
    }
