"""Crash safety with real processes: a child saves (or deletes, or compacts) checkpoints and is SIGKILLed at random
moments. Saves run in both layouts; in the hot one a background thread compacts while the next save comes.

Afterwards every committed checkpoint loads bit-exactly (the parent recomputes the child's deterministic
states), every save the child reported as finished is committed, verify() is ok, gc() removes the leftovers and
the store keeps working.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import ckptstore
from ckptstore.storage.local import TMP_SUFFIX

pytestmark = pytest.mark.slow

# Shared by the child (as source) and the parent (exec'd): the state of step i, about 20 MB.
STATE_SRC = """
import functools

import numpy as np

N_W, N_H = 4_000_000, 2_000_000  # float32 16 MB + float16 4 MB


@functools.lru_cache(maxsize=1)
def _base(seed):
    g = np.random.default_rng(seed)
    return g.standard_normal(N_W, dtype=np.float32), g.standard_normal(N_H, dtype=np.float32).astype(np.float16)


def state_for(seed, i):
    w, h = (a.copy() for a in _base(seed))
    r = np.random.default_rng([seed, i])
    idx = r.integers(0, N_W, N_W // 8)
    w[idx] = np.nextafter(w[idx], np.float32(np.inf))  # a training step: small moves, so deltas are used
    h[r.integers(0, N_H, 1000)] += np.float16(0.5)
    return {"model": {"w": w, "h": h}, "step": np.int64(i), "opt": {"lr": 0.1 / (i + 1), "i": i}}
"""

CHILD_SAVE = (
    STATE_SRC
    + """
import sys
import ckptstore

path, seed, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = ckptstore.open_store(path, keyframe_interval=4)
print("ready", flush=True)
for i in range(start, start + count):
    state = state_for(seed, i)
    print(f"start {i}", flush=True)
    store.save("run", i, state, {"epoch": i})
    print(f"saved {i}", flush=True)
print("done", flush=True)
"""
)

# The same saves through save_async: "snap i" once the call returned (the state is then changed in place at once,
# as a training step would), "saved i" from on_commit. Kills land while the worker encodes and commits.
CHILD_SAVE_ASYNC = (
    STATE_SRC
    + """
import sys
import ckptstore

path, seed, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = ckptstore.open_store(path, keyframe_interval=4)
print("ready", flush=True)
for i in range(start, start + count):
    state = state_for(seed, i)
    print(f"start {i}", flush=True)
    store.save_async("run", i, state, {"epoch": i}, on_commit=lambda info: print(f"saved {info.step}", flush=True))
    print(f"snap {i}", flush=True)
    state["model"]["w"] += 1.0  # the caller's tensors change right after the call; the stored ones must not
    state["model"]["h"][:] = 0
store.close()
print("done", flush=True)
"""
)

CHILD_DELETE = """
import sys
import ckptstore

store = ckptstore.open_store(sys.argv[1])
print("start", flush=True)
store.delete(sys.argv[2:])
print("deleted", flush=True)
"""

CHILD_COMPACT = """
import sys
import ckptstore

store = ckptstore.open_store(sys.argv[1], compaction="manual")
print("start", flush=True)
store.compact("run", newest=sys.argv[2] == "1")
print("compacted", flush=True)
"""

_ns: dict[str, Any] = {}
exec(STATE_SRC, _ns)
state_for = _ns["state_for"]


def _spawn(code: str, *args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def _kill_after(proc: subprocess.Popen[str], wait_for: str | None, delay: float) -> list[str]:
    """Read the child's lines until one starts with ``wait_for`` (if given), sleep ``delay``, SIGKILL it;
    return every line it printed."""
    lines: list[str] = []
    assert proc.stdout is not None
    if wait_for is not None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith(wait_for):
                break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    lines += [x.strip() for x in out.splitlines()]
    assert proc.returncode in (-signal.SIGKILL, 0), err[-2000:]
    return lines


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and TMP_SUFFIX in p.name]


def _committed(path: Path, prefix: str) -> list[str]:
    """The store's keys under ``prefix``, without the temporary files of writes a kill cut short."""
    return [k for k in ckptstore.open_store(path).storage.list(prefix) if TMP_SUFFIX not in k]


def _check_store(path: Path, seed: int, expect_present: set[int], maybe: set[int]) -> list[int]:
    store = ckptstore.open_store(path)
    steps = store.steps("run")
    assert expect_present <= set(steps), f"committed saves lost: {sorted(expect_present - set(steps))}"
    assert set(steps) <= expect_present | maybe, f"unexpected checkpoints {sorted(set(steps) - expect_present)}"
    for step in steps:
        got = store.load(f"run@{step}")
        want = state_for(seed, step)
        assert got["model"]["w"].tobytes() == want["model"]["w"].tobytes(), step
        assert got["model"]["h"].tobytes() == want["model"]["h"].tobytes(), step
        assert got["step"] == want["step"] and got["opt"] == want["opt"]
    res = store.verify()
    assert res["ok"], res["problems"]
    return steps


def _gc_and_check_clean(path: Path) -> None:
    store = ckptstore.open_store(path)
    store.gc()
    assert _leftovers(path) == []
    live = {rec["pack"] for r in store.runs() for s in store.steps(r) for rec in store.manifest(r, s).objects.values()}
    assert set(store.storage.list("packs")) == live, "gc left unreferenced packs"
    assert store.gc()["removed_packs"] == 0


@pytest.mark.parametrize("layout", ["dense", "hot"])
def test_sigkill_during_saves(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "store"
    ckptstore.create_store(path, layout=layout)
    seed = 1234
    rnd = random.Random(seed)
    reported: set[int] = set()
    started: set[int] = set()
    next_step = 0
    kills_mid_save = 0
    round_ = 0
    # at least 6 rounds, and more (up to 14) until three kills have landed inside a save
    while round_ < 6 or (kills_mid_save < 3 and round_ < 14):
        proc = _spawn(CHILD_SAVE, path, seed, next_step, 6)
        if round_ % 3 == 0:  # anywhere: while starting up, between saves, inside a save
            lines = _kill_after(proc, None, rnd.uniform(0.2, 2.5))
        else:  # inside a save: after it announced step k, a random moment later
            target = next_step + rnd.randrange(0, 3)
            lines = _kill_after(proc, f"start {target}", rnd.uniform(0.0, 0.15))
        for line in lines:
            kind, _, num = line.partition(" ")
            if kind == "saved":
                reported.add(int(num))
            elif kind == "start":
                started.add(int(num))
        if lines and lines[-1].startswith("start"):
            kills_mid_save += 1
        steps = ckptstore.open_store(path).steps("run")
        assert reported <= set(steps), "a save that returned was lost"
        assert set(steps) <= started, "a checkpoint appeared that was never saved"
        next_step = max(steps, default=-1) + 1
        round_ += 1
    assert kills_mid_save >= 3, "the test should kill the child inside saves"
    committed = _check_store(path, seed, reported, started)
    _gc_and_check_clean(path)
    assert ckptstore.open_store(path).steps("run") == committed
    # the store goes on: a new save (delta against the last committed one) and a full check
    store = ckptstore.open_store(path)
    store.save("run", next_step, state_for(seed, next_step))
    _check_store(path, seed, {*committed, next_step}, set())


def test_sigkill_during_async_saves(tmp_path: Path) -> None:
    """SIGKILL while the background worker encodes or commits: every committed checkpoint stays intact and
    bit-exact to the state at call time (the child mutated its tensors right after each call)."""
    path = tmp_path / "store"
    ckptstore.create_store(path)
    seed = 4321
    rnd = random.Random(seed)
    reported: set[int] = set()
    started: set[int] = set()
    next_step = 0
    kills_in_background = 0
    round_ = 0
    while round_ < 5 or (kills_in_background < 3 and round_ < 12):
        proc = _spawn(CHILD_SAVE_ASYNC, path, seed, next_step, 5)
        target = next_step + rnd.randrange(0, 3)
        lines = _kill_after(proc, f"snap {target}", rnd.uniform(0.0, 0.3))
        snapped = {int(x.split()[1]) for x in lines if x.startswith("snap ")}
        for line in lines:
            kind, _, num = line.partition(" ")
            if kind == "saved":
                reported.add(int(num))
            elif kind == "start":
                started.add(int(num))
        if snapped - reported:  # a save was handed to the worker and never reported committed
            kills_in_background += 1
        steps = ckptstore.open_store(path).steps("run")
        assert reported <= set(steps), "a save reported committed was lost"
        assert set(steps) <= started, "a checkpoint appeared that was never saved"
        next_step = max(steps, default=-1) + 1
        round_ += 1
    assert kills_in_background >= 3, "the test should kill the child while saves are in the background"
    committed = _check_store(path, seed, reported, started)
    # committed files only: a kill between a manifest's temporary write and its rename leaves a `.tmp-` file,
    # which gc removes (and _gc_and_check_clean checks it did)
    before = {k: (path / k).read_bytes() for k in _committed(path, "runs")}
    _gc_and_check_clean(path)
    after = {k: (path / k).read_bytes() for k in _committed(path, "runs")}
    assert before == after, "gc after the kills changed a committed manifest"
    store = ckptstore.open_store(path)
    h = store.save_async("run", next_step, state_for(seed, next_step))
    h.result()
    store.close()
    _check_store(path, seed, {*committed, next_step}, set())


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.4])
def test_sigkill_during_delete(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "store"
    seed = 99
    store = ckptstore.create_store(path, keyframe_interval=4)
    for i in range(6):
        store.save("run", i, state_for(seed, i))
    store.close()
    doomed = {1, 2, 4}
    keep = {0, 3, 5}
    proc = _spawn(CHILD_DELETE, path, *(f"run@{s}" for s in sorted(doomed)))
    lines = _kill_after(proc, "start", delay)
    finished = "deleted" in lines
    steps = _check_store(path, seed, keep, doomed)
    if finished:
        assert set(steps) == keep
    _gc_and_check_clean(path)
    # finishing the interrupted delete works and leaves exactly the kept checkpoints
    store = ckptstore.open_store(path)
    left = sorted(set(store.steps("run")) & doomed)
    if left:
        store.delete([f"run@{s}" for s in left])
    assert _check_store(path, seed, keep, set()) == sorted(keep)
    _gc_and_check_clean(path)


@pytest.mark.parametrize(("delay", "newest"), [(0.0, False), (0.15, False), (0.5, True), (1.0, False)])
def test_sigkill_during_compaction(tmp_path: Path, delay: float, newest: bool) -> None:
    path = tmp_path / "store"
    seed = 7
    store = ckptstore.create_store(path, keyframe_interval=3, layout="hot", compaction="manual")
    for i in range(6):
        store.save("run", i, state_for(seed, i))
    store.close()
    proc = _spawn(CHILD_COMPACT, path, int(newest))
    lines = _kill_after(proc, "start", delay)
    hot = [s for s in range(6) if ckptstore.open_store(path).manifest("run", s).data.get("layout") == "hot"]
    if "compacted" in lines:
        assert hot == ([] if newest else [5])
    _check_store(path, seed, set(range(6)), set())  # every checkpoint intact, hot or compacted
    _gc_and_check_clean(path)
    # finishing the interrupted compaction works and leaves every checkpoint bit-exact
    store = ckptstore.open_store(path, compaction="manual")
    store.compact("run", newest=newest)
    assert [s for s in range(6) if store.manifest("run", s).data.get("layout") == "hot"] == ([] if newest else [5])
    _check_store(path, seed, set(range(6)), set())
    _gc_and_check_clean(path)
