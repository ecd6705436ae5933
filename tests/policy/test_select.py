"""Key-checkpoint selection: always first and last, coverage of the progress curve, metric change points."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.policy import Entry, select

HYP = settings(max_examples=200, deadline=None)


@st.composite
def runs(draw: st.DrawFn) -> list[Entry]:
    steps = sorted(draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=60, unique=True)))
    with_path = draw(st.booleans())
    with_metric = draw(st.booleans())
    out, path = [], 0.0
    for s in steps:
        path += draw(st.floats(0, 3))
        m = {"val_loss": draw(st.floats(0, 5))} if with_metric and draw(st.integers(0, 4)) else {}
        out.append(Entry(s, metrics=m, path=path if with_path else None))
    return out


@given(runs(), st.integers(0, 20))
@HYP
def test_selection_contains_first_and_last_and_has_the_right_size(es: list[Entry], n: int) -> None:
    got = select(es, n)
    steps = [c.step for c in got]
    assert steps == sorted(set(steps))
    assert set(steps) <= {e.step for e in es}
    assert steps[0] == es[0].step and steps[-1] == es[-1].step
    assert len(steps) == min(len(es), max(2, n))
    assert all(c.reason and c.kind in ("first", "last", "coverage", "change", "all") for c in got)
    assert select(list(reversed(es)), n) == got  # order of the input does not matter; deterministic


@given(runs(), st.integers(2, 12), st.data())
@HYP
def test_coverage_only_selection_is_stable_under_thinning(es: list[Entry], n: int, data: st.DataObject) -> None:
    """Without metrics the choice depends only on fixed coordinates: any subset holding it gives it back."""
    es = [Entry(e.step, path=e.path) for e in es]
    chosen = {c.step for c in select(es, n)}
    extra = data.draw(st.sets(st.sampled_from([e.step for e in es])))
    sub = [e for e in es if e.step in chosen | extra]
    assert {c.step for c in select(sub, n)} == chosen


def test_fast_early_phase_gets_more_checkpoints() -> None:
    # Weights move like sqrt(step): most of the path is travelled early.
    es = [Entry(s, path=math.sqrt(s)) for s in range(0, 1001, 10)]
    got = select(es, 10)
    early = sum(c.step < 333 for c in got)
    late = sum(c.step >= 667 for c in got)
    assert early > late >= 1
    coverage = [c for c in got if c.kind == "coverage"]
    assert coverage and all("of the weight path" in c.reason for c in coverage)
    # Without paths, coverage is even in steps.
    flat = select([Entry(e.step) for e in es], 5)
    assert [c.step for c in flat] == [0, 250, 500, 750, 1000]


def test_metric_change_points_are_chosen_and_explained() -> None:
    # A plateau, a sudden drop at step 300, a slow decline, a knee at 700.
    def loss(s: int) -> float:
        if s < 300:
            return 4.0
        if s < 700:
            return 2.0 - (s - 300) / 400
        return 1.0

    es = [Entry(s, metrics={"val_loss": loss(s), "loss.avg": 0.0}) for s in range(0, 1001, 20)]
    got = select(es, 8)
    change = [c for c in got if c.kind == "change"]
    assert change, got
    assert all(c.reason.startswith("metric change point: val_loss is") for c in change)
    steps = {c.step for c in got}
    assert steps & {280, 300}  # either side of the drop
    assert any(abs(s - 700) <= 40 for s in steps)  # the knee (a coverage pick may land next to it)
    assert {c.phase for c in got} == {"early", "middle", "late"}


def test_small_runs() -> None:
    assert select([], 5) == []
    (only,) = select([Entry(3)], 5)
    assert only.step == 3 and only.kind == "first"
    got = select([Entry(1), Entry(2), Entry(3)], 8)
    assert [c.kind for c in got] == ["first", "all", "last"]
