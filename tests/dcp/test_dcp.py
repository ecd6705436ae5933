"""torch.distributed.checkpoint into the store, with real processes: every rank is its own python process
(``_worker.py``), gloo on CPU, DTensor shards (uneven ones too), FSDP2 ``fully_shard``, ``dcp.async_save``.

* 4 ranks save, 2 and 3 ranks load under another sharding: bit-exact (the workers compare bytes); ``verify`` clean;
  ``Store.load`` gives the full, unsharded state on one process; shards dedup across steps and delta-code;
* the same on the moto S3 server;
* a rank SIGKILLed after writing its pack: no checkpoint committed, the previous one intact, ``gc`` frees the pack;
* two jobs committing the same checkpoint: a clear error, and the loser's packs are freed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _worker import full_state

from ckptstore.errors import CheckpointExistsError, IntegrityError, StoreLockedError
from ckptstore.format.tree import Leaf
from ckptstore.store import Store, create_store, open_store
from ckptstore.testing.s3 import CREDENTIALS, MotoS3Server, moto_buckets

WORKER = Path(__file__).with_name("_worker.py")


def ranks(
    url: str, *stages: str, options: dict[str, Any] | None = None, env: dict[str, str] | None = None, ok: bool = True
) -> str:
    """Run the stages (``WORLD:ACTION:STEP:LAYOUT``) one after the other, each on its own gloo group of forked
    rank processes (``_worker.py``), and return their output."""
    argv = [sys.executable, str(WORKER), url, json.dumps(options), *stages]
    proc = subprocess.run(
        argv, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, timeout=180
    )
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    if ok:
        assert proc.returncode == 0, text[-3000:]
        for st in stages:
            world, action = st.split(":")[:2]
            assert f"OK {action} {world}" in text
    return text


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def check_store(store: Store, steps: list[int]) -> None:
    assert store.steps("run") == steps
    assert store.verify()["ok"]
    for s in steps:
        state = store.load(f"run@{s}", tensors="torch")
        full = full_state(s)
        for k in ("w", "b", "h", "frozen"):
            assert bits(state["model"][k]) == bits(full[k]), k
        assert bits(state["optim"]["m"]) == bits(full["m"])
        assert state["optim"]["step"] == s and state["optim"]["lr"] == 0.5
        assert bits(state["plain"]) == bits(torch.arange(3.0) + s)
        assert store.load_tensor(f"run@{s}", "model/w", tensors="torch").shape == (64, 40)


def test_save_on_4_ranks_load_on_2_and_3(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    create_store(url)
    # step 2 by dcp.async_save, same sharding: deltas against step 1's shards; then rows -> columns, 4 -> 2 / 3
    # ranks; and an FSDP2 model (fully_shard on CPU), 4 ranks saving, 2 loading
    ranks(url, "4:save:1:a", "4:async_save:2:a", "2:load:2:b", "3:load:1:b", "4:fsdp_save:5:a", "2:fsdp_load:5:a")
    store = open_store(url)
    check_store(store, [1, 2])
    m1, m2 = store.manifest("run", 1), store.manifest("run", 2)
    # every shard is an object; the frozen (replicated) tensor is written once and reused by step 2
    assert len([n for n in m1.tensors if n.startswith("model/w/@")]) == 4
    assert m1.tensors["model/frozen/@0,0"]["object"] == m2.tensors["model/frozen/@0,0"]["object"]
    shard = m2.tensors["model/w/@16,0"]["object"]
    assert m2.objects[shard]["refs"]["prev"] == m1.tensors["model/w/@16,0"]["object"]  # delta-coded
    assert len(m2.data["packs"]) == 4  # one pack per rank
    assert m2.info().stored_bytes < m1.info().stored_bytes
    torch.manual_seed(0)  # the FSDP2 model of _worker.py, as one process builds it
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    state = store.load("fsdp@5", tensors="torch")
    for k, v in model.state_dict().items():
        assert bits(state["model"][k]) == bits(v), k


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3Server]:
    pytest.importorskip("s3fs")
    with moto_buckets("dcp") as server:
        yield server


def test_on_s3(moto: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    url = "s3://dcp/store"
    options = moto.storage_options()
    create_store(url, storage_options=options)
    ranks(url, "4:save:1:a", "3:load:1:b", options=options)
    check_store(open_store(url, storage_options=options), [1])


def test_killed_rank_commits_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    create_store(url)
    ranks(url, "4:save:1:a")
    packs_before = set(open_store(url).storage.list("packs"))
    text = ranks(url, "4:kill:2:a", env={"DIE_RANK": "2"}, ok=False)
    assert f"rank 2 exited with {-signal.SIGKILL}" in text  # the launcher then kills its peers
    store = open_store(url)
    orphans = set(store.storage.list("packs")) - packs_before
    assert any("-r2-" in k for k in orphans)  # the killed rank did write its pack
    check_store(store, [1])  # no step 2; step 1 intact
    assert store.gc()["removed_packs"] == len(orphans)
    assert set(store.storage.list("packs")) == packs_before
    check_store(open_store(url), [1])


def test_two_jobs_committing_the_same_checkpoint(tmp_path: Path) -> None:
    store = create_store(tmp_path / "store")
    leaf = Leaf.from_numpy(np.arange(6, dtype=np.float32))
    skeleton = {"x": {"$tensor": "x"}}
    first = store.write_shards("run", 3, {"x/@0": leaf}, None, writer="r0-aaaa")
    second = store.write_shards("run", 3, {"x/@0": Leaf.from_numpy(np.ones(6, np.float32))}, None, writer="r0-bbbb")
    store.commit_shards("run", 3, [first], skeleton)
    with pytest.raises(CheckpointExistsError, match="another job"):
        store.commit_shards("run", 3, [second], skeleton)
    assert not any(store.storage.exists(p) for p in second["packs"])
    assert all(store.storage.exists(p) for p in first["packs"])
    assert store.verify()["ok"]


def test_a_gc_never_frees_a_sharded_save_into_a_committed_checkpoint(tmp_path: Path) -> None:
    """A rank's pack exists before any manifest names it. gc waits while a rank writes (the store-wide lock is
    held shared); a gc between a rank's write and the commit frees the pack, and the commit then refuses rather
    than commit a checkpoint with missing objects."""
    store = create_store(tmp_path / "store")
    other = open_store(tmp_path / "store")  # another process's handle: `ckpt gc` run by hand
    leaf = Leaf.from_numpy(np.arange(6, dtype=np.float32))
    skeleton = {"x": {"$tensor": "x"}}
    with store._shared_lock(), pytest.raises(StoreLockedError):  # what write_shards holds while it writes
        other.gc()
    part = store.write_shards("run", 3, {"x/@0": leaf}, None, writer="r0-aaaa")
    assert part["packs"] and all(store.storage.exists(p) for p in part["packs"])
    assert other.gc()["removed_packs"] == 1  # an orphan to gc: nothing names it yet
    with pytest.raises(IntegrityError, match="vanished before its commit"):
        store.commit_shards("run", 3, [part], skeleton)
    assert store.steps("run") == []
    again = store.write_shards("run", 3, {"x/@0": leaf}, None, writer="r0-bbbb")
    store.commit_shards("run", 3, [again], skeleton)
    assert store.steps("run") == [3]
    assert store.load_leaves("run@3", ["x/@0"])["x/@0"].data.tobytes() == leaf.data.tobytes()
