"""The plain-PyTorch Recorder: save policies applied in a real training loop, reasons in metadata, online
retention, weight-change-triggered saving that follows the learning-rate schedule."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

import ckptstore  # noqa: E402
from ckptstore import torch as ckpt_torch  # noqa: E402
from ckptstore.policy import InvalidPolicyError, WeightChange  # noqa: E402
from ckptstore.recorder import Recorder, WeightTracker, plain_metrics  # noqa: E402

STEPS = 240
WARMUP = 24


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits_loop(rec: Recorder | None, *, steps: int = STEPS, seed: int = 0) -> tuple[Any, list[float]]:
    """AdamW on scikit-learn's digits, linear warm-up then cosine decay; the recorder is called every step."""
    torch.manual_seed(seed)
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def lr_at(s: int) -> float:
        if s < WARMUP:
            return (s + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (steps - WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if rec is not None:
        rec.model, rec.optimizer, rec.scheduler = model, opt, sched
        if rec.tracker is not None:
            rec.tracker = WeightTracker(model)
            rec.tracker.reset()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if rec is not None:
            rec.step(step, epoch=step / 28, metrics={"loss": loss}, is_last=step == steps)
    return model, losses


def placeholder() -> torch.nn.Module:
    return torch.nn.Linear(1, 1)


def test_weight_change_saves_more_often_early_than_late(tmp_path: Path) -> None:
    """Warm-up + cosine decay: the weights move fast early and barely at the end, so a weight-change trigger saves
    densely early and sparsely late."""
    store = ckptstore.create_store(tmp_path / "s")
    rec = Recorder(store, "wc", model=placeholder(), policy="first, weights:0.1, last")
    digits_loop(rec)
    steps = store.steps("wc")
    first_half = sum(1 for s in steps if s <= STEPS // 2)
    second_half = sum(1 for s in steps if s > STEPS // 2)
    first_quarter = sum(1 for s in steps if s <= STEPS // 4)
    last_quarter = sum(1 for s in steps if s > 3 * STEPS // 4)
    print(f"weight-change saves at steps {steps}: {first_half} in the first half, {second_half} in the second")
    assert first_half >= 2 * second_half, steps
    assert first_quarter > last_quarter, steps
    gaps = np.diff(steps)
    assert gaps[: len(gaps) // 2].mean() < gaps[len(gaps) // 2 :].mean()
    metas = [store.manifest("wc", s).metadata for s in steps]
    assert metas[0]["save_reason"] == "first checkpoint of the run"
    assert all("weights moved" in m["save_reason"] for m in metas[1:-1])
    assert metas[-1]["save_reason"].endswith("end of training")
    assert metas[2]["save_policy"]["kind"] == "any"
    assert metas[2]["weight_change"]["*"] >= 0.1
    # The recorder wrote the weight path: strictly increasing, each hop the recorded distance.
    paths = [m["trajectory"]["path_length"] for m in metas]
    assert paths[0] == 0.0 and all(b > a for a, b in itertools.pairwise(paths))


def test_schedule_reasons_resume_and_metrics_after_the_save(
    tmp_path: Path, assert_same_state: Callable[[object, object], None]
) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    rec = Recorder(store, "r", model=placeholder(), policy="log:2:until=64:then=100, metric:loss:abs=100, last")
    model, _ = digits_loop(rec)
    steps = store.steps("r")
    assert steps[:8] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert 200 in steps and steps[-1] == STEPS
    m = store.manifest("r", 64).metadata
    assert m["save_reason"].startswith("log-spaced, base 2 (step 64)")
    assert m["step"] == 64 and "loss" in m["metrics"] and m["epoch"] == pytest.approx(64 / 28)
    assert m["versions"]["torch"] == torch.__version__  # provenance from ckptstore.metadata.capture
    # The last checkpoint restores the model exactly.
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ckpt_torch.restore(store, "r@latest", fresh)
    assert_same_state(fresh.state_dict(), model.state_dict())
    # Evaluation results arriving after the step was saved go into that checkpoint; nothing is saved twice.
    d = rec.step(STEPS, metrics={"val_acc": 0.93})
    assert not d and "metrics were updated" in d.reason
    assert store.manifest("r", STEPS).metadata["metrics"]["val_acc"] == 0.93
    assert store.steps("r") == steps
    assert not rec.step(STEPS - 5)


def test_online_retention_keeps_last_best_and_pinned(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    rec = Recorder(store, "o", model=placeholder(), policy="steps:20", keep="last:2,best:val_loss",
                   record_path=False, capture=False)  # fmt: skip
    rec.model = torch.nn.Linear(3, 3)
    losses = {20: 5.0, 40: 1.0, 60: 3.0, 80: 4.0, 100: 6.0, 120: 7.0}
    for s in range(1, 121):
        rec.step(s, metrics={"val_loss": losses[s]} if s in losses else None)
        if s == 60:
            rec.pin(60)
    assert store.steps("o") == [40, 60, 100, 120]
    assert rec.last_retention is not None
    assert rec.last_retention.keep[60] == ["pinned"]
    assert "best val_loss" in rec.last_retention.keep[40][0]


def test_recorder_with_a_state_function_and_forced_saves(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.float32)
    rec = Recorder(tmp_path / "new.ckpt", "np", state=lambda: {"w": arr.copy()}, policy="epochs:2", capture=False)
    assert not rec.step(1, epoch=1)
    assert rec.step(2, epoch=2).reason == "every 2 epochs (epoch 2)"
    arr += 1
    assert rec.save(3, reason="before the risky change").reason == "before the risky change"
    store = ckptstore.open_store(tmp_path / "new.ckpt")
    assert store.steps("np") == [2, 3]
    assert store.load("np@3")["w"].tolist() == (np.arange(10) + 1).tolist()
    assert store.manifest("np", 3).metadata["trajectory"]["distance"] == pytest.approx(math.sqrt(10))


def test_weight_tracker_exact_and_sampled() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 2))
    exact = WeightTracker(model, sample=0)
    sampled = WeightTracker(model, sample=4096)
    exact.reset()
    sampled.reset()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    after = model.state_dict()
    want = math.sqrt(sum(float((after[k] - before[k]).double().square().sum()) for k in before)) / math.sqrt(
        sum(float(before[k].double().square().sum()) for k in before)
    )
    got = exact.distances()
    assert got["*"] == pytest.approx(want, rel=1e-5)
    assert set(got) == {"*", "0", "1"}
    assert sampled.distances()["*"] == pytest.approx(want, rel=0.2)
    exact.reset()
    assert exact.distances()["*"] == 0.0
    grouped = WeightTracker(model, modules=["1"])
    assert set(grouped.distances()) == {"*", "1", "other"}


def test_plain_metrics_and_errors(tmp_path: Path) -> None:
    assert plain_metrics({"a": torch.tensor(1.5), "b": np.float32(2), "c": float("nan"), "d": "x", "e": True,
                          "f": torch.ones(3)}) == {"a": 1.5, "b": 2.0}  # fmt: skip
    with pytest.raises(InvalidPolicyError):
        Recorder(tmp_path / "s", "x", state=dict, policy="weights:0.1")
    with pytest.raises(InvalidPolicyError):
        Recorder(tmp_path / "s", "x")
    assert isinstance(Recorder(tmp_path / "s", "x", model=placeholder(), policy=WeightChange(0.2)).tracker,
                      WeightTracker)  # fmt: skip


# ------------------------------------------------------------------------------------------------ async saves
def _words(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_async_recorder_stores_the_state_at_call_time(tmp_path: Path) -> None:
    """The default (async_save=True): each save returns after the snapshot; the optimizer step right after it
    changes the weights and AdamW moments in place, and the stored checkpoint is still the state at the call."""
    store = ckptstore.create_store(tmp_path / "s")
    rec = Recorder(store, "a", model=placeholder(), policy="steps:20, last", keep="last:3", capture=False)
    assert rec.async_save
    at_call: dict[int, dict[str, bytes]] = {}
    real_step = rec.step

    def step_and_remember(step: int, **kw: Any) -> Any:
        assert rec.model is not None and rec.optimizer is not None
        before = {f"model/{k}": _words(v) for k, v in rec.model.state_dict().items()}
        for i, st in rec.optimizer.state_dict()["state"].items():
            before.update({f"optimizer/state/{i}/{k}": _words(v) for k, v in st.items() if torch.is_tensor(v)})
        d = real_step(step, **kw)
        if d:
            at_call[step] = before
        return d

    rec.step = step_and_remember  # type: ignore[method-assign]
    digits_loop(rec, steps=100)
    assert store.steps("a") == [60, 80, 100]  # retention ran after each background commit
    for step in (60, 80, 100):
        got = store.load(f"a@{step}", tensors="torch")
        for name, want in at_call[step].items():
            node: Any = got
            for part in name.split("/"):
                key: Any = int(part) if isinstance(node, dict) and part.isdigit() and int(part) in node else part
                node = node[key]
            assert _words(node) == want, (step, name)
    assert [i.step for i in rec.saved] == [20, 40, 60, 80, 100]
    assert all(e.stored_bytes > 0 for e in rec.history)  # filled in once each commit was done
    assert store.verify()["ok"]


def test_async_recorder_raises_a_background_failure_at_the_next_save(tmp_path: Path) -> None:
    """A real background failure: another writer holds the store's lock while the save commits."""
    from ckptstore.errors import StoreLockedError
    from ckptstore.format.spec import LOCK_FILE

    store = ckptstore.create_store(tmp_path / "s")
    other = ckptstore.open_store(tmp_path / "s")
    rec = Recorder(store, "f", state=lambda: {"w": np.zeros(10)}, policy="steps:1", record_path=False, capture=False)
    with other.storage.lock(LOCK_FILE):
        assert rec.step(1)  # returns: the snapshot is taken; the commit fails on the lock in the background
        assert rec._pending is not None
        while not rec._pending.done():
            time.sleep(0.01)
    with pytest.raises(StoreLockedError) as exc:
        rec.step(2)  # the next save raises it (and saves nothing)
    assert any("background save of f@1" in n for n in exc.value.__notes__)
    assert [e.step for e in rec.history] == []  # the failed save left the policy's history
    assert rec.step(3)
    rec.finish(4)
    assert ckptstore.open_store(tmp_path / "s").steps("f") == [3, 4]  # finish() waited for the commit
    assert [e.step for e in rec.history] == [3, 4]


def test_sync_recorder_saves_on_the_calling_thread(tmp_path: Path) -> None:
    store = ckptstore.create_store(tmp_path / "s")
    rec = Recorder(store, "s", state=lambda: {"w": np.ones(4)}, policy="steps:1", async_save=False, capture=False)
    rec.step(1)
    assert rec._pending is None and ckptstore.open_store(tmp_path / "s").steps("s") == [1]
