"""``ckpt watch``: follow an unmodified ``open_clip_train`` run and store each ``epoch_N.pt`` once complete.

Unit tests drive :class:`Watcher.scan` with a fake clock over small real ``torch.save`` files. The end-to-end test
launches the real trainer (``--dataset-type synthetic``, tiny model, 3 epochs, ``--save-frequency 1``,
``--save-most-recent``) with ``ckpt watch --prune --pid`` running beside it, checks what was stored and pruned,
replays a trainer killed mid-write with the run's real bytes, and resumes training from an exported checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import ckptstore  # noqa: E402
from ckptstore.integrations.openclip import export_pt  # noqa: E402
from ckptstore.integrations.watch import Watcher, pid_alive  # noqa: E402

RUN = "job"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def write_ckpt(path: Path, epoch: int, *, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + epoch)
    state = {
        "epoch": epoch,
        "name": RUN,
        "state_dict": {"visual.w": torch.randn(64, 32, generator=g), "text.b": torch.randn(32, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(epoch)), "exp_avg": torch.randn(64, 32, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs" / RUN
    (d / "checkpoints").mkdir(parents=True)
    (d / "params.txt").write_text("batch_size: 64\nlr: 0.001\nmodel: tiny\n")
    (d / "checkpoints" / "results.jsonl").write_text(json.dumps({"clip_val_loss": 2.5, "epoch": 1}) + "\n")
    (d / "out.log").write_text(
        "2026-01-01,00:00:00 | INFO | start\n"
        "2026-01-01,00:00:09 | INFO | Train Epoch: 0 [ 64/128 (50%)] Data (t): 0.1 LR: 0.000250 "
        "Contrastive_loss: 4.2 (4.3) Loss: 4.2000 (4.3000)\n"
    )
    return d


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[ckptstore.Store]:
    st = ckptstore.create_store(tmp_path / "s.ckpt")
    yield st
    st.close()


def scans(w: Watcher, clock: Clock, n: int, *, dt: float = 5.0) -> list[str]:
    kinds = []
    for _ in range(n):
        clock.t += dt
        kinds += [e.kind for e in w.scan()]
    return kinds


def test_partial_file_is_never_stored_and_the_complete_one_is(
    run_dir: Path, store: ckptstore.Store, assert_same_state: Callable[[object, object], None]
) -> None:
    ck = run_dir / "checkpoints"
    full = ck.parent / "full.pt"
    state = write_ckpt(full, 1)
    data = full.read_bytes()
    (ck / "epoch_1.pt").write_bytes(data[: len(data) // 2])  # the trainer was killed mid-write
    (ck / "epoch_latest.pt").write_bytes(data)  # never touched
    (ck / "tmp.pt").write_bytes(data[:100])  # never touched
    clock = Clock()
    w = Watcher(store, run_dir, run=RUN, prune=True, settle=2.0, clock=clock)
    kinds = scans(w, clock, 4)
    assert kinds == ["incomplete"]  # tried once, then left alone until the file changes
    assert store.runs() == []
    assert (ck / "epoch_1.pt").exists()
    w.scan(final=True)
    assert store.runs() == []  # even the final pass does not store a file that does not load

    os.replace(full, ck / "epoch_1.pt")  # the resumed trainer writes the epoch again, completely
    kinds = scans(w, clock, 3)
    assert kinds == ["stored", "pruned"]
    assert store.steps(RUN) == [1]
    assert_same_state(store.load(f"{RUN}@1"), state)
    assert not (ck / "epoch_1.pt").exists()
    assert (ck / "epoch_latest.pt").read_bytes() == data and (ck / "tmp.pt").exists()
    meta = store.manifest(RUN, 1).metadata
    assert meta["hparams"]["batch_size"] == 64 and meta["model"] == "tiny"  # params.txt
    assert meta["metrics"]["clip_val_loss"] == 2.5  # results.jsonl
    assert meta["loss"]["last"] == 4.2  # out.log
    assert meta["save_reason"] == "open_clip_train wrote epoch_1.pt; stored by ckpt watch"
    assert meta["trajectory"]["path_length"] == 0.0


def test_a_growing_file_waits_until_its_size_settles(run_dir: Path, store: ckptstore.Store) -> None:
    ck = run_dir / "checkpoints"
    write_ckpt(ck / "full.bin", 2)
    data = (ck / "full.bin").read_bytes()
    target = ck / "epoch_2.pt"
    clock = Clock()
    w = Watcher(store, run_dir, run=RUN, settle=2.0, clock=clock)
    for cut in (0.2, 0.5, 0.8, 1.0):  # written in pieces between scans
        target.write_bytes(data[: int(len(data) * cut)])
        assert scans(w, clock, 1) == []
    assert scans(w, clock, 1, dt=1.0) == []  # unchanged, but not for `settle` seconds yet
    assert scans(w, clock, 1) == ["stored"]
    assert store.steps(RUN) == [2]


def test_nothing_is_removed_unless_it_was_committed(
    run_dir: Path, store: ckptstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = run_dir / "checkpoints"
    write_ckpt(ck / "epoch_1.pt", 1)
    clock = Clock()
    w = Watcher(store, run_dir, run=RUN, prune=True, settle=0.0, clock=clock)

    def fail(*a: Any, **k: Any) -> Any:
        raise ckptstore.CkptStoreError("disk full")

    monkeypatch.setattr(store, "save", fail)
    assert scans(w, clock, 2) == ["error"]
    assert (ck / "epoch_1.pt").exists() and store.runs() == []


def test_a_restarted_watcher_prunes_what_is_stored_and_keeps_conflicts(run_dir: Path, store: ckptstore.Store) -> None:
    ck = run_dir / "checkpoints"
    write_ckpt(ck / "epoch_1.pt", 1)
    write_ckpt(ck / "epoch_2.pt", 2)
    clock = Clock()
    Watcher(store, run_dir, run=RUN, clock=clock).scan(final=True)  # stored, not pruned
    assert store.steps(RUN) == [1, 2]
    write_ckpt(ck / "epoch_2.pt", 2, seed=99)  # a different epoch 2 (e.g. after a resume)
    w = Watcher(store, ck, run=RUN, prune=True, clock=clock)
    kinds = [e.kind for e in w.scan(final=True)]
    assert kinds == ["exists", "pruned", "conflict"]
    assert not (ck / "epoch_1.pt").exists() and (ck / "epoch_2.pt").exists()


def test_online_retention_while_watching(run_dir: Path, store: ckptstore.Store) -> None:
    ck = run_dir / "checkpoints"
    clock = Clock()
    w = Watcher(store, run_dir, run=RUN, keep="last:2", settle=0.0, clock=clock)
    for e in range(1, 5):
        write_ckpt(ck / f"epoch_{e}.pt", e)
        scans(w, clock, 2)
    assert store.steps(RUN) == [3, 4]
    assert [e.kind for e in w.events].count("thinned") == 2
    paths = [store.manifest(RUN, s).metadata["trajectory"]["path_length"] for s in (3, 4)]
    assert 0 < paths[0] < paths[1]  # measured from the epochs that were stored, thinned or not


def test_run_until_stops_when_the_process_exits_or_nothing_happens(run_dir: Path, store: ckptstore.Store) -> None:
    write_ckpt(run_dir / "checkpoints" / "epoch_1.pt", 1)
    events = Watcher(store, run_dir, run=RUN).run_until(poll=0.01, idle_timeout=0)
    assert [e.kind for e in events] == ["stored"]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid) and pid_alive(os.getpid())
    write_ckpt(run_dir / "checkpoints" / "epoch_2.pt", 2)
    events = Watcher(store, run_dir, run=RUN).run_until(poll=0.01, pid=child.pid)
    assert [e.kind for e in events] == ["exists", "stored"]


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_watch_a_real_open_clip_train_run_then_resume_from_an_export(
    tmp_path: Path, assert_same_state: Callable[[object, object], None]
) -> None:
    for module in ("open_clip", "open_clip_train", "pandas"):
        pytest.importorskip(module)
    from ckptstore.demo import trajectory as tj

    epochs = 3
    store_path = tmp_path / "s.ckpt"
    proc, run_dir = tj.run_open_clip_train(
        tmp_path / "train", epochs=epochs, dataset="synthetic", n_images=128, name="watched", wait=False,
        extra_args=["--save-most-recent"],
    )  # fmt: skip
    watcher = subprocess.Popen(
        [sys.executable, "-m", "ckptstore.cli", "watch", str(run_dir / "checkpoints"), "--store", str(store_path),
         "--init", "--prune", "--pid", str(proc.pid), "--poll", "0.5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.wait(timeout=600) == 0, (tmp_path / "train" / "console.log").read_text()[-3000:]
        out, err = watcher.communicate(timeout=300)
    finally:
        for p in (proc, watcher):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    stored = [e for e in events if e["event"] == "stored"]
    assert [e["step"] for e in stored] == [1, 2, 3], events
    pruned = [Path(e["file"]).name for e in events if e["event"] == "pruned"]
    assert pruned == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_latest.pt"]  # never ingested, never pruned
    store = ckptstore.open_store(store_path)
    assert store.steps("watched") == [1, 2, 3] and store.verify()["ok"]
    meta = store.manifest("watched", 3).metadata
    assert meta["hparams"]["dataset_type"] == "synthetic" and meta["epoch"] == 3
    assert "loss" in meta and meta["trajectory"]["prev_step"] == 2
    # The last epoch, as stored, is bit-identical to what the trainer wrote (epoch_latest.pt holds the same dict).
    latest = torch.load(ck / "epoch_latest.pt", map_location="cpu", weights_only=True)
    assert_same_state(store.load("watched@3", tensors="torch"), latest)

    # A trainer killed mid-write, replayed with the run's real bytes: the partial file is never stored.
    data = (ck / "epoch_latest.pt").read_bytes()
    replay = tmp_path / "replay" / "checkpoints"
    replay.mkdir(parents=True)
    (replay / "epoch_3.pt").write_bytes(data[: len(data) * 2 // 5])
    clock = Clock()
    store2 = ckptstore.create_store(tmp_path / "s2.ckpt")
    w = Watcher(store2, replay, run="replay", settle=1.0, clock=clock)
    assert scans(w, clock, 3) == ["incomplete"] and store2.runs() == []
    shutil.copyfile(ck / "epoch_latest.pt", replay / "epoch_3.pt")
    assert scans(w, clock, 2) == ["stored"]
    assert_same_state(store2.load("replay@3", tensors="torch"), latest)

    # Resume training from an exported checkpoint.
    exported = export_pt(store, "watched@epoch=2", tmp_path / "exports" / "epoch_2.pt")
    _done, resumed = tj.run_open_clip_train(
        tmp_path / "resume", epochs=epochs, dataset="synthetic", n_images=128, name="resumed",
        extra_args=["--resume", str(exported)],
    )  # fmt: skip
    log = (resumed / "out.log").read_text(errors="replace")
    assert f"=> resuming checkpoint '{exported}' (epoch 2)" in log, log[-3000:]
    assert not (resumed / "checkpoints" / "epoch_2.pt").exists()
    assert torch.load(resumed / "checkpoints" / "epoch_3.pt", map_location="cpu", weights_only=True)["epoch"] == 3
