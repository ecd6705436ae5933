"""Per-run write locks (issue 14, item 4), on local disk and on S3 (moto server):

* two jobs writing *different* runs of one store at the same time both succeed;
* two writers of the *same* run: the second gets a clear error at once, or waits when asked (``lock_wait``);
* store-wide work (gc) waits for run writers and they wait for it;
* a stress test: writer processes, a deleting + gc'ing thread and reader threads at once, bounded in time;
  readers only ever see committed checkpoints, bit-exact.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptstore.errors import CheckpointNotFoundError, StoreLockedError
from ckptstore.format.manifest import run_lock_key
from ckptstore.store import Store, create_store, open_store

BUCKET = "ckpt-locks"


def state(run: str, step: int, n: int = 4000) -> dict[str, Any]:
    """Deterministic content of ``run@step``: what every reader checks its bytes against."""
    rng = np.random.default_rng([sum(map(ord, run)), step])
    return {"w": rng.standard_normal(n, dtype=np.float32), "b": rng.integers(0, 9, 64), "step": step}


def same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(np.asarray(got[k]).tobytes() == np.asarray(want[k]).tobytes() for k in ("w", "b")) and (
        got["step"] == want["step"]
    )


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from ckptstore.testing.s3 import moto_buckets

    with moto_buckets(BUCKET) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Store]:
    """``make(**options)``: a new Store handle on one fresh store (each call: another job's handle)."""
    if request.param == "local":
        loc = str(tmp_path / "store")
        opts: dict[str, Any] = {}
    else:
        server = request.getfixturevalue("s3")
        loc = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
        opts = {"storage_options": server.storage_options(backoff=0.005, max_backoff=0.05)}
    create_store(loc, **opts).close()
    return lambda **kw: open_store(loc, **opts, **kw)


def hold_save(store: Store, run: str, step: int, started: threading.Event, release: threading.Event) -> None:
    """Save ``run@step``, pausing inside the save (the lock held) until ``release``."""

    def progress(done: int, total: int) -> None:
        started.set()
        assert release.wait(30)

    store.save(run, step, state(run, step), progress=progress)


def test_writers_of_different_runs_go_on_at_once(make: Callable[..., Store]) -> None:
    barrier = threading.Barrier(2, timeout=30)  # both saves must be inside their lock at the same time
    errors: list[BaseException] = []

    def job(run: str) -> None:
        try:
            st = make()
            for step in (1, 2, 3):
                meet = (lambda d, t: barrier.wait()) if step == 2 else None
                st.save(run, step, state(run, step), progress=meet)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=job, args=(r,)) for r in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    reader = make()
    for run in ("a", "b"):
        assert reader.steps(run) == [1, 2, 3]
        assert all(same(reader.load(f"{run}@{s}"), state(run, s)) for s in (1, 2, 3))
    assert reader.verify()["ok"]


def test_second_writer_of_one_run_fails_clearly_or_waits(make: Callable[..., Store]) -> None:
    started, release = threading.Event(), threading.Event()
    first = threading.Thread(target=hold_save, args=(make(), "a", 1, started, release))
    first.start()
    try:
        assert started.wait(30)
        with pytest.raises(StoreLockedError, match="another writer is writing run 'a'") as err:
            make().save("a", 2, state("a", 2))
        assert "lock_wait" in str(err.value) and "Errno" not in str(err.value)
        make().save("b", 1, state("b", 1))  # another run: goes on
        threading.Timer(0.5, release.set).start()
        t0 = time.monotonic()
        make(lock_wait=30).save("a", 2, state("a", 2))  # waits for the first writer, then saves
        assert time.monotonic() - t0 >= 0.3
    finally:
        release.set()
        first.join(30)
    reader = make()
    assert reader.steps("a") == [1, 2] and same(reader.load("a@2"), state("a", 2))


def test_gc_and_run_writers_exclude_each_other(make: Callable[..., Store]) -> None:
    st = make()
    st.save("a", 1, state("a", 1))
    started, release = threading.Event(), threading.Event()
    writer = threading.Thread(target=hold_save, args=(make(), "a", 2, started, release))
    writer.start()
    try:
        assert started.wait(30)
        with pytest.raises(StoreLockedError):
            make().gc()  # a save's pack is not yet named by a manifest: gc must not run now
        threading.Timer(0.5, release.set).start()
        assert make(lock_wait=30).gc()["removed_packs"] == 0
    finally:
        release.set()
        writer.join(30)
    g = make()
    with g._write_lock(), pytest.raises(StoreLockedError, match="store-wide operation"):  # gc in progress
        make().save("b", 1, state("b", 1))
    make().save("b", 1, state("b", 1))
    assert make().verify()["ok"] and make().steps("a") == [1, 2]


WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from ckptstore.store import open_store
from test_run_locks import state
store = open_store({loc!r}, lock_wait=float(sys.argv[3]))
run, n = sys.argv[1], int(sys.argv[2])
for step in range(1, n + 1):
    store.save(run, step, state(run, step))
print("saved", run, n)
"""


def writer_proc(loc: str, run: str, n: int, wait: float = 0.0) -> subprocess.Popen[str]:
    code = WRITER.format(tests=str(Path(__file__).parent), loc=loc)
    return subprocess.Popen([sys.executable, "-c", code, run, str(n), str(wait)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))  # fmt: skip


def test_processes_writing_other_runs_while_a_run_is_held(tmp_path: Path) -> None:
    loc = str(tmp_path / "store")
    store = create_store(loc)
    with store._run_lock("a"):  # this process is writing run a
        other = writer_proc(loc, "b", 3)
        _, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        same_run = writer_proc(loc, "a", 1)
        _, err = same_run.communicate(timeout=120)
        assert same_run.returncode != 0 and "another writer is writing run 'a'" in err
    assert (tmp_path / "store" / run_lock_key("a")).exists()  # the lock file stays; the flock is gone
    assert open_store(loc).steps("b") == [1, 2, 3] and open_store(loc).steps("a") == []


def test_stress_readers_see_only_committed_checkpoints(make: Callable[..., Store], tmp_path: Path) -> None:
    """Writers (processes on local disk, threads on S3), a thread deleting run c's older checkpoints and
    running gc (repacks included), and reader threads loading whatever is committed, for a bounded time."""
    base = make()
    for s in range(1, 7):
        base.save("c", s, state("c", s))
    loc = base.url
    local = "://" not in loc
    deadline = time.monotonic() + 20
    failures: list[str] = []
    reads = {"ok": 0, "gone": 0}
    stop = threading.Event()
    procs: list[subprocess.Popen[str]] = []
    threads: list[threading.Thread] = []
    n_saves = 5

    if local:
        procs = [writer_proc(loc, run, n_saves, wait=60) for run in ("p", "q")]
    else:

        def thread_writer(run: str) -> None:
            try:
                st = make(lock_wait=60)
                for step in range(1, n_saves + 1):
                    st.save(run, step, state(run, step))
            except Exception as exc:
                failures.append(f"writer {run}: {type(exc).__name__}: {exc}")

        threads += [threading.Thread(target=thread_writer, args=(r,)) for r in ("p", "q")]

    def maintainer() -> None:
        st = make(lock_wait=60)
        try:
            for s in (1, 3, 5):
                st.delete([f"c@{s}"])
                st.gc()
                if stop.is_set():
                    return
        except Exception as exc:
            failures.append(f"maintainer: {type(exc).__name__}: {exc}")

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        st = make()
        while not stop.is_set() and time.monotonic() < deadline:
            run = rnd.choice(["c", "p", "q"])
            steps = st.steps(run)
            if not steps:
                continue
            step = rnd.choice(steps)
            try:
                got = st.load(f"{run}@{step}")
            except CheckpointNotFoundError:
                reads["gone"] += 1  # deleted after we listed it: never half there
                continue
            except Exception as exc:
                failures.append(f"read {run}@{step}: {type(exc).__name__}: {exc}")
                continue
            if not same(got, state(run, step)):
                failures.append(f"read {run}@{step}: wrong bytes")
            reads["ok"] += 1

    threads += [threading.Thread(target=maintainer)] + [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for p in procs:
        _, err = p.communicate(timeout=180)
        if p.returncode != 0:
            failures.append(f"writer process: {err[-500:]}")
    for t in threads[: len(threads) - 3]:
        t.join(180)
    stop.set()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert reads["ok"] > 10
    final = make()
    assert final.steps("c") == [2, 4, 6] and final.steps("p") == final.steps("q") == list(range(1, n_saves + 1))
    res = final.verify()
    assert res["ok"], res["problems"][:3]
