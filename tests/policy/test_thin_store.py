"""Thinning a real store: the plan from metadata and weight paths, deletion, bit-exact survivors, the CLI."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.cli.main import main as ckpt_main
from ckptstore.policy import parse_retention, thin

RUN = "toy"
STEPS = list(range(0, 130, 10))  # 13 checkpoints


def ckpt(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue()


def make_states() -> dict[int, dict[str, Any]]:
    """A toy trajectory: weights that move fast early and slowly later, Adam-like state, a loss that drops."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(4096).astype(np.float32)
    b = np.zeros(64, dtype=np.float32)
    out = {}
    for s in STEPS:
        lr = 0.05 / (1 + s / 20)
        w = (w + lr * rng.standard_normal(w.size)).astype(np.float32)
        b = (b + lr).astype(np.float32)
        out[s] = {"model": {"w": w.copy(), "b": b.copy()}, "optimizer": {"m": (w * 0.1).astype(np.float32)},
                  "step": s}  # fmt: skip
    return out


@pytest.fixture()
def store(tmp_path: Path) -> tuple[ckptstore.Store, dict[int, dict[str, Any]]]:
    st = ckptstore.create_store(tmp_path / "s.ckpt")
    states = make_states()
    for s, state in states.items():
        st.save(RUN, s, state, {"metrics": {"val_loss": 3.0 / (1 + s / 30)}, "epoch": s // 10})
    return st, states


def test_paths_are_the_l2_distances_between_consecutive_weights(store: Any) -> None:
    st, states = store
    recs = thin.compute_paths(st, RUN)
    total = 0.0
    for prev, cur in itertools.pairwise(STEPS):
        a, b = states[prev]["model"], states[cur]["model"]
        d = float(np.sqrt(sum(np.sum((b[k].astype(np.float64) - a[k].astype(np.float64)) ** 2) for k in a)))
        total += d
        assert recs[cur]["prev_step"] == prev
        assert recs[cur]["distance"] == pytest.approx(d, rel=1e-9)
        assert recs[cur]["path_length"] == pytest.approx(total, rel=1e-9)
        assert recs[cur]["weights"] == "model/" and not recs[cur]["recorded"]
    assert recs[0]["path_length"] == 0.0


def test_thin_keeps_survivors_bit_exact_and_frees_bytes(
    store: Any, assert_same_state: Callable[[object, object], None]
) -> None:
    st, states = store
    thin.pin(st, f"{RUN}@30")
    the_plan, recs = thin.plan_thin(st, RUN, "select:5,best:val_loss")
    keep = sorted(the_plan.keep)
    assert 30 in keep and the_plan.keep[30] == ["pinned"]
    assert keep[0] == 0 and keep[-1] == 120
    before = st.stats(RUN)["pack_bytes"]
    res = thin.apply_plan(st, RUN, the_plan, recs)
    after = st.stats(RUN)["pack_bytes"]
    assert res["freed_bytes"] == before - after > 0
    assert sorted(res["deleted"]) == sorted(f"{RUN}@{s}" for s in the_plan.drop)
    assert st.steps(RUN) == keep
    assert st.verify()["ok"]
    for s in keep:
        assert_same_state(st.load(f"{RUN}@{s}"), states[s])
    # The kept checkpoints now carry their weight path, so a second plan gives the same answer: nothing to do.
    assert all(st.manifest(RUN, s).metadata["trajectory"]["path_length"] == recs[s]["path_length"] for s in keep)
    again, _ = thin.plan_thin(st, RUN, "select:5,best:val_loss")
    assert not again.drop and sorted(again.keep) == keep


def test_cli_thin_dry_run_then_apply_and_select(store: Any, tmp_path: Path) -> None:
    st, _states = store
    path = str(tmp_path / "s.ckpt")
    rc, out = ckpt("select", RUN, "4", "--store", path, "--json")
    assert rc == 0, out
    sel = json.loads(out)
    assert sel["choices"][0]["step"] == 0 and sel["choices"][-1]["step"] == 120
    assert all(c["reason"] for c in sel["choices"]) and sel["of"] == len(STEPS)

    rc, out = ckpt("thin", RUN, "--keep", "last:2", "--keep", "log:2", "--store", path, "--dry-run", "--json")
    assert rc == 0, out
    dry = json.loads(out)
    assert dry["dry_run"] and st.steps(RUN) == STEPS  # nothing deleted
    assert [k["step"] for k in dry["keep"]] == [0, 10, 20, 40, 70, 110, 120]
    rc, text = ckpt("thin", RUN, "--keep", "last:2,log:2", "--store", path, "--dry-run")
    assert rc == 0 and "keeps 7, removes 6" in text and "dry run: nothing deleted" in text

    rc, out = ckpt("thin", RUN, "--keep", "last:2", "--keep", "log:2", "--store", path, "--json")
    assert rc == 0, out
    done = json.loads(out)
    assert st.steps(RUN) == [0, 10, 20, 40, 70, 110, 120]
    assert done["freed_bytes"] == done["run_bytes_before"] - done["run_bytes_after"] > 0
    assert 0.5 * dry["freed_estimate"] <= done["freed_bytes"] <= 1.5 * dry["freed_estimate"]
    rc, out = ckpt("thin", RUN, "--keep", "last:2,log:2", "--store", path, "--json")
    assert rc == 0 and json.loads(out)["drop"] == []  # idempotent

    rc, _ = ckpt("thin", RUN, "--keep", "bogus:1", "--store", path)
    assert rc == 2


def test_plan_from_metadata_only_needs_no_weights(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = store

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("weights were read")

    monkeypatch.setattr(st, "load_leaves", boom)
    the_plan, recs = thin.plan_thin(st, RUN, parse_retention("last:3,best:val_loss,every:50"))
    assert recs == {} and sorted(the_plan.keep) == [0, 50, 100, 110, 120]
