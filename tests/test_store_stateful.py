"""The Store against a plain dict model, through random save / delete / thin / compact / gc / verify / reopen
sequences, in both layouts (dense, and hot with compaction: docs/format.md §4.7)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ckptstore
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError

RUNS = ("a", "b")


def _fresh_state(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((12, 20)) * 0.1).astype(np.float32),
        "h": rng.standard_normal(40).astype(np.float16),
        "i": rng.integers(-1000, 1000, 16).astype(np.int64),
        "c": np.full(64, 7, dtype=np.uint8),
        "meta": {"n": int(seed), "tags": ("x", seed % 3)},
        "optimizer": {"m": rng.standard_normal(48).astype(np.float32)},
    }


def _evolve(prev: dict[str, Any], how: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    if how == "fresh":
        return _fresh_state(seed)
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in prev.items()}
    out["optimizer"] = {"m": prev["optimizer"]["m"].copy()}
    if how == "same":
        return out
    if how == "nudge":
        w = out["w"].reshape(-1)
        idx = rng.random(w.size) < 0.3
        w[idx] = np.nextafter(w[idx], np.float32(np.inf if seed % 2 else -np.inf))
        out["h"][rng.integers(0, out["h"].size, 5)] += np.float16(0.001)
        out["i"] += 1
        out["optimizer"]["m"][rng.integers(0, 48, 6)] += np.float32(0.01)
    elif how == "one":
        out["i"][rng.integers(0, out["i"].size)] ^= 1
    out["meta"] = {"n": int(seed), "tags": ("x", seed % 3)}
    return out


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ckpt-stateful-"))
        self.model: dict[tuple[str, int], dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}  # the last state saved per run: the next one evolves from it
        self.store: ckptstore.Store | None = None

    @initialize(interval=st.sampled_from([2, 3, 3, 4, 8]), layout=st.sampled_from(["dense", "hot"]))
    def create(self, interval: int, layout: str) -> None:
        # compaction by the rule below only: the background thread would make the steps depend on timing
        self.store = ckptstore.create_store(
            self.dir / "store", keyframe_interval=interval, layout=layout, compaction="manual"
        )

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def s(self) -> ckptstore.Store:
        assert self.store is not None
        return self.store

    def _save(self, run: str, step: int, how: str, seed: int) -> None:
        prev = self.last.get(run) or _fresh_state(seed + 1)
        state = _evolve(prev, how, seed)
        if (run, step) in self.model:
            with pytest.raises(CheckpointExistsError):
                self.s.save(run, step, state, {"epoch": seed})
            return
        self.s.save(run, step, state, {"epoch": seed})
        self.model[(run, step)] = state
        self.last[run] = state

    @rule(
        run=st.sampled_from(["a", "a", "a", "b"]),
        gap=st.integers(1, 5),
        how=st.sampled_from(["nudge", "nudge", "nudge", "same", "one", "fresh"]),
        seed=st.integers(0, 2**16),
    )
    def save_next(self, run: str, gap: int, how: str, seed: int) -> None:
        """The usual case: the run goes on, each state a small step from the last."""
        steps = [s for r, s in self.model if r == run]
        self._save(run, max(steps, default=-1) + gap, how, seed)

    @rule(
        run=st.sampled_from(RUNS),
        step=st.integers(0, 40),
        how=st.sampled_from(["nudge", "same", "fresh"]),
        seed=st.integers(0, 2**16),
    )
    def save_anywhere(self, run: str, step: int, how: str, seed: int) -> None:
        """Out-of-order steps, and steps that already exist (refused)."""
        self._save(run, step, how, seed)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        keys = sorted(self.model)
        doomed = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
        res = self.s.delete([f"{r}@{s}" for r, s in doomed])
        assert res["deleted"] == sorted(f"{r}@{s}" for r, s in doomed)
        for k in doomed:
            del self.model[k]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), length=st.integers(1, 3))
    def delete_range(self, data: st.DataObject, length: int) -> None:
        """Consecutive checkpoints of one run: cuts through delta chains and keyframes."""
        run = data.draw(st.sampled_from(sorted({r for r, _ in self.model})))
        steps = sorted(s for r, s in self.model if r == run)
        start = data.draw(st.integers(0, len(steps) - 1))
        doomed = [(run, s) for s in steps[start : start + length]]
        self.s.delete([f"{r}@{s}" for r, s in doomed])
        for k in doomed:
            del self.model[k]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def drop_optimizer(self, data: st.DataObject) -> None:
        """The weights-only tier: the optimizer state of some checkpoints goes, the rest stays bit-exact."""
        keys = sorted(self.model)
        chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
        res = self.s.drop_parts([f"{r}@{s}" for r, s in chosen])
        assert res["changed"] == [f"{r}@{s}" for r, s in sorted(chosen) if "optimizer" in self.model[(r, s)]]
        for k in chosen:
            self.model[k] = {n: v for n, v in self.model[k].items() if n != "optimizer"}

    @rule(run=st.sampled_from(RUNS), step=st.integers(10**6, 10**6 + 5))
    def delete_missing(self, run: str, step: int) -> None:
        with pytest.raises(CheckpointNotFoundError):
            self.s.delete([f"{run}@{step}"])

    @rule()
    def gc(self) -> None:
        self.s.gc()
        assert self.s.gc()["removed_packs"] == 0  # a second gc finds nothing

    @rule()
    def verify(self) -> None:
        res = self.s.verify()
        assert res["ok"], res["problems"]
        assert res["checkpoints"] == len(self.model)

    @rule(run=st.sampled_from([*RUNS, None]), newest=st.booleans())
    def compact(self, run: str | None, newest: bool) -> None:
        """Hot checkpoints re-encoded densely (all but each run's newest unless ``newest``); values unchanged."""
        self.s.compact(run, newest=newest)
        for r in [run] if run else RUNS:
            steps = self.s.steps(r)
            left = [s for s in steps if self.s.manifest(r, s).data.get("layout") == "hot"]
            assert set(left) <= (set() if newest else set(steps[-1:])), (r, left)
        assert self.s.compact(run, newest=newest)["compacted"] == []  # nothing left to do

    @rule(interval=st.sampled_from([2, 3, 8]))
    def reopen(self, interval: int) -> None:
        self.s.close()
        self.store = ckptstore.open_store(self.dir / "store", keyframe_interval=interval, compaction="manual")

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def load_tensor(self, data: st.DataObject) -> None:
        run, step = data.draw(st.sampled_from(sorted(self.model)))
        name = data.draw(st.sampled_from(["w", "h", "i", "c"]))
        got = self.s.load_tensor(f"{run}@{step}", name)
        assert got.tobytes() == self.model[(run, step)][name].tobytes()

    @invariant()
    def refs_match_the_model(self) -> None:
        if self.store is None:
            return
        want = {r: sorted(s for rr, s in self.model if rr == r) for r in RUNS}
        assert self.s.runs() == sorted(r for r in RUNS if want[r])
        for r in RUNS:
            assert self.s.steps(r) == want[r]

    @invariant()
    def hot_checkpoints_read_one_object_per_tensor(self) -> None:
        if self.store is None:
            return
        for run, step in self.model:
            m = self.s.manifest(run, step)
            if m.data.get("layout") == "hot":
                assert all(len(m.chain(t["object"])) == 1 for t in m.tensors.values()), (run, step)

    @invariant()
    def every_checkpoint_loads_bit_exactly(self) -> None:
        if self.store is None:
            return
        for (run, step), state in self.model.items():
            got = self.s.load(f"{run}@{step}")
            assert set(got) == set(state)
            for k in ("w", "h", "i", "c"):
                assert got[k].dtype == state[k].dtype and got[k].shape == state[k].shape
                assert got[k].tobytes() == state[k].tobytes(), (run, step, k)
            assert got["meta"] == state["meta"]
            if "optimizer" in state:
                assert got["optimizer"]["m"].tobytes() == state["optimizer"]["m"].tobytes(), (run, step)


# No shrink phase: shrinking a failing run of this machine can take minutes, and the unshrunk run (at most 15
# steps) is printed in full anyway. Add Phase.shrink locally to minimise a failure.
StoreMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreMachine = StoreMachine.TestCase
