"""Retention policies and plans: definitions, stability under thinning, idempotence, pinned/best/latest kept."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.policy import (
    Entry,
    InvalidPolicyError,
    KeepBest,
    KeepEvery,
    KeepFirst,
    KeepLast,
    KeepLogSpaced,
    KeepPinned,
    KeepSelect,
    KeepTagged,
    RetentionPolicy,
    Union,
    parse_retention,
    plan,
    retention_from_json,
)

HYP = settings(max_examples=150, deadline=None)


@st.composite
def histories(draw: st.DrawFn, min_size: int = 1, max_size: int = 40) -> list[Entry]:
    steps = sorted(draw(st.lists(st.integers(0, 2000), min_size=min_size, max_size=max_size, unique=True)))
    out = []
    path = 0.0
    for s in steps:
        metrics = {}
        if draw(st.booleans()) or s == steps[0]:
            metrics["val_loss"] = draw(st.floats(0, 10, allow_nan=False))
        if draw(st.booleans()):
            metrics["acc"] = draw(st.sampled_from([0.1, 0.5, 0.5, 0.9]))  # ties on purpose
        path += draw(st.floats(0, 5))
        tags = tuple(draw(st.lists(st.sampled_from(["pinned", "keep", "x"]), max_size=2, unique=True)))
        out.append(Entry(s, metrics=metrics, tags=tags, pinned="pinned" in tags,
                         stored_bytes=draw(st.integers(0, 10**6)), path=path))  # fmt: skip
    return out


stable = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(KeepFirst, st.integers(1, 4)),
    st.builds(KeepBest, st.sampled_from(["val_loss", "acc"]), st.integers(1, 4), st.sampled_from([None, "min", "max"])),
    st.builds(KeepEvery, st.integers(1, 700)),
    st.builds(KeepLogSpaced, st.sampled_from([1.5, 2.0, 3.0, 10.0])),
    st.builds(KeepTagged, st.sampled_from([None, "keep", "x"])),
    st.just(KeepPinned()),
)  # fmt: skip
anything = st.one_of(stable, st.builds(KeepSelect, st.integers(1, 10)))


def steps_of(entries: Sequence[Entry]) -> list[int]:
    return [e.step for e in entries]


# ------------------------------------------------------------------------------------------- definitions
def test_last_first_best() -> None:
    es = [Entry(s, metrics={"loss": v}) for s, v in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 1.0), (5, 4.0)]]
    assert sorted(KeepLast(2).keep(es)) == [4, 5]
    assert KeepLast(2).keep(es)[5] == "last 2 (1st newest)"
    assert sorted(KeepFirst(2).keep(es)) == [1, 2]
    assert KeepBest("loss").keep(es) == {2: "best loss (lowest: 1)"}  # a tie goes to the earlier step
    assert sorted(KeepBest("loss", 2).keep(es)) == [2, 4]
    assert sorted(KeepBest("loss", 2, "max").keep(es)) == [1, 5]


@given(histories(), st.sampled_from([1.5, 2.0, 3.0, 10.0]))
@HYP
def test_log_spaced_matches_its_definition(es: list[Entry], base: float) -> None:
    steps = steps_of(es)
    targets = [0.0] + [base**k for k in range(64) if base**k <= steps[-1]]
    want = {min(s for s in steps if s >= t) for t in targets if any(s >= t for s in steps)}
    assert set(KeepLogSpaced(base).keep(es)) == want


@given(histories(), st.integers(1, 700))
@HYP
def test_every_matches_its_definition(es: list[Entry], n: int) -> None:
    steps = steps_of(es)
    want = {min(s for s in steps if s >= t) for t in range(0, steps[-1] + 1, n) if any(s >= t for s in steps)}
    assert set(KeepEvery(n).keep(es)) == want


def test_every_on_epochs_and_log_on_pythia_steps() -> None:
    epochs = [Entry(e) for e in range(1, 21)]
    assert sorted(KeepEvery(5).keep(epochs)) == [1, 5, 10, 15, 20]
    assert sorted(KeepLogSpaced(2).keep(epochs)) == [1, 2, 4, 8, 16]
    hundreds = [Entry(s) for s in range(0, 2001, 100)]
    assert sorted(KeepLogSpaced(2).keep(hundreds)) == [0, 100, 200, 300, 600, 1100]


# ------------------------------------------------------------------------------------------- guarantees
@given(histories(), stable, st.data())
@HYP
def test_stable_policies_keep_the_same_from_any_subset_that_holds_it(
    es: list[Entry], pol: RetentionPolicy, data: st.DataObject
) -> None:
    """K(S) ⊆ T ⊆ S ⇒ K(T) = K(S): what makes thinning by these policies idempotent without iteration."""
    kept = set(pol.keep(es))
    extra = data.draw(st.sets(st.sampled_from(steps_of(es))))
    sub = [e for e in es if e.step in kept | extra]
    assert set(pol.keep(sub)) == kept


@given(histories(), st.lists(anything, min_size=1, max_size=4))
@HYP
def test_thinning_is_idempotent(es: list[Entry], pols: list[RetentionPolicy]) -> None:
    first = plan(es, pols)
    assert set(first.keep) | set(first.drop) == set(steps_of(es))
    again = plan(first.kept, pols)
    assert not again.drop, again.drop
    assert set(again.keep) == set(first.keep)


@given(histories(), st.lists(anything, min_size=1, max_size=4))
@HYP
def test_pinned_best_and_latest_are_never_removed(es: list[Entry], pols: list[RetentionPolicy]) -> None:
    p = plan(es, pols)
    for e in es:
        if e.is_pinned:
            assert e.step in p.keep and "pinned" in p.keep[e.step]
    assert es[-1].step in p.keep
    for pol in pols:
        if isinstance(pol, KeepBest):
            assert set(pol.keep(es)) <= set(p.keep)
    assert p.freed_estimate == sum(e.stored_bytes for e in es if e.step in p.drop)
    for s in p.keep:
        assert p.keep[s] and all(p.keep[s])
    for s in p.drop:
        assert p.drop[s]


def test_plan_explains_and_counts() -> None:
    es = [Entry(s, metrics={"val_loss": 10.0 / s}, stored_bytes=100 * s, tags=("pinned",) if s == 3 else ())
          for s in range(1, 11)]  # fmt: skip
    p = plan(es, parse_retention("last:2,best:val_loss"))
    assert sorted(p.keep) == [3, 9, 10]
    assert p.keep[3] == ["pinned"]
    assert p.keep[10] == ["last 2 (1st newest)", "best val_loss (lowest: 1)", "latest checkpoint (the resume point)"]
    assert p.drop[5] == "no policy keeps it"
    assert p.freed_estimate == 100 * sum([1, 2, 4, 5, 6, 7, 8])
    assert json.loads(json.dumps(p.as_dict()))["freed_estimate"] == p.freed_estimate
    assert not plan(es, [KeepLast(1)], keep_pinned=False, keep_latest=False).keep.get(3)


def test_union_and_json() -> None:
    pols = parse_retention(["last:3", "best:val_loss:2:max", "every:5,log:2", "tagged:keep", "pinned", "select:8"])
    assert pols == [KeepLast(3), KeepBest("val_loss", 2, "max"), KeepEvery(5), KeepLogSpaced(2.0),
                    KeepTagged("keep"), KeepPinned(), KeepSelect(8)]  # fmt: skip
    u = Union(tuple(pols))
    assert retention_from_json(json.loads(json.dumps(u.to_json()))) == u
    for pol in pols:
        assert retention_from_json(pol.to_json()) == pol
    assert u.needs_paths and not KeepLast(1).needs_paths
    assert parse_retention("best:acc:k=3:mode=max") == [KeepBest("acc", 3, "max")]
    assert parse_retention("select:4:metric=val_loss|acc") == [KeepSelect(4, ("val_loss", "acc"))]


@pytest.mark.parametrize("spec", ["", "last:0", "last:x", "best", "every", "log:1", "what:3", "tagged:a:b=c:d"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(InvalidPolicyError):
        parse_retention(spec)


def test_duplicate_steps_are_refused() -> None:
    with pytest.raises(InvalidPolicyError):
        plan([Entry(1), Entry(1)], [KeepLast(1)])
