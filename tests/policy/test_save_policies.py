"""Save policies: each schedule and trigger against its definition, the combinators, JSON and the text form."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.policy import (
    OVERALL,
    AllOf,
    AnyOf,
    Decision,
    Entry,
    EveryEpochs,
    EverySeconds,
    EverySteps,
    First,
    InvalidPolicyError,
    Last,
    LogSpaced,
    MetricChange,
    SavePolicy,
    WeightChange,
    parse_save_policy,
    save_policy_from_json,
    simulate,
)

HYP = settings(max_examples=150, deadline=None)


def fired(policy: SavePolicy, steps: range | list[int], **kw: object) -> list[int]:
    return [s for s, _ in simulate(policy, list(steps), last=False, **kw)]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- schedules
def test_every_steps_fires_on_multiples_and_never_skips_one() -> None:
    assert fired(EverySteps(100), range(1, 451)) == [100, 200, 300, 400]
    assert fired(EverySteps(100, offset=5), range(0, 320)) == [105, 205, 305]
    # Called every 7 steps: the first call at or after each multiple of 10 saves.
    assert fired(EverySteps(10), range(0, 50, 7)) == [14, 21, 35, 42]
    d = EverySteps(10).should_save(30, prev_step=29)
    assert d and d.reason == "every 10 steps (step 30)"


@given(n=st.integers(1, 50), calls=st.lists(st.integers(0, 500), min_size=1, max_size=60, unique=True))
@HYP
def test_every_steps_fires_once_per_interval_holding_a_multiple(n: int, calls: list[int]) -> None:
    calls.sort()
    got = fired(EverySteps(n), calls)
    want = [
        s for i, s in enumerate(calls)
        if any(m % n == 0 and m > 0 for m in range((calls[i - 1] + 1) if i else s, s + 1))
    ]  # fmt: skip
    assert got == want


def test_every_epochs_counts_completed_epochs_and_fractions() -> None:
    p = EveryEpochs(2)
    assert not p.should_save(10, epoch=0)
    assert not p.should_save(11, epoch=1.0, prev_epoch=0.75)
    d = p.should_save(12, epoch=2.0, prev_epoch=1.75)
    assert d and "epoch 2" in d.reason
    assert not p.should_save(13, epoch=2.25, prev_epoch=2.0)
    assert not p.should_save(14)  # no epoch given: never


def test_every_seconds_uses_the_last_save_time() -> None:
    p = EverySeconds(60)
    assert not p.should_save(1, time=59.0)
    assert p.should_save(2, time=61.0)
    assert not p.should_save(3, time=100.0, history=[Entry(2, time=61.0)])
    d = p.should_save(4, time=125.0, history=[Entry(2, time=61.0)])
    assert d and "since the last save" in d.reason


def test_log_spaced_is_pythias_schedule() -> None:
    pythia = LogSpaced(2, then_every=1000)
    want = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
    assert fired(pythia, range(0, 3001)) == want
    assert pythia.steps(3000) == want
    assert "after the log-spaced start" in pythia.should_save(2000, prev_step=1999).reason
    assert "log-spaced, base 2" in pythia.should_save(64, prev_step=63).reason


def _definition(base: float, start: int, until: int | None, then: int | None, zero: bool, upto: int) -> list[int]:
    """LogSpaced's docstring, written out independently."""
    limit = until if until is not None else then
    out = {0} if zero else set()
    log = []
    k = 0
    while True:
        x = start * base**k
        v = math.ceil(x - abs(x) * 1e-9)
        if (limit is not None and v > limit) or v > upto:
            break
        log.append(v)
        k += 1
    out |= set(log)
    if then is not None:
        last = 0
        k = 0
        while True:
            x = start * base**k
            v = math.ceil(x - abs(x) * 1e-9)
            if v > limit:  # type: ignore[operator]
                break
            last = v
            k += 1
        out |= {m for m in range(then, upto + 1, then) if m > last}
    return sorted(s for s in out if s <= upto)


@given(
    base=st.sampled_from([1.1, 1.5, 2.0, 3.0, math.e, 10.0]),
    start=st.integers(1, 20),
    until=st.none() | st.integers(0, 400),
    then=st.none() | st.integers(1, 150),
    zero=st.booleans(),
)
@HYP
def test_log_spaced_matches_its_definition(
    base: float, start: int, until: int | None, then: int | None, zero: bool
) -> None:
    p = LogSpaced(base, start=start, until=until, then_every=then, zero=zero)
    want = _definition(base, start, until, then, zero, 600)
    assert fired(p, range(0, 601)) == want
    assert p.steps(600) == want


@given(calls=st.lists(st.integers(0, 3000), min_size=1, max_size=80, unique=True))
@HYP
def test_log_spaced_never_skips_a_scheduled_step(calls: list[int]) -> None:
    """Calls at arbitrary steps: a save at the first call at or after each scheduled step, and nowhere else."""
    calls.sort()
    p = LogSpaced(2, until=512, then_every=1000)
    sched = set(p.steps(3000))
    got = fired(p, calls)
    want = [s for i, s in enumerate(calls) if any(t in sched for t in range(calls[i - 1] + 1 if i else s, s + 1))]
    assert got == want


def test_first_and_last() -> None:
    assert First().should_save(7).reason == "first checkpoint of the run"
    assert not First().should_save(8, history=[Entry(7)])
    assert not Last().should_save(9)
    assert Last().should_save(9, is_last=True).reason == "end of training"


# ---------------------------------------------------------------------------------------------- triggers
def test_metric_change_relative_absolute_and_best() -> None:
    hist = [Entry(100, metrics={"val_loss": 0.50}), Entry(200, metrics={"val_loss": 0.52})]
    rel = MetricChange("val_loss", rel=0.1)
    assert not rel.should_save(300, {"val_loss": 0.48}, history=hist)
    d = rel.should_save(300, {"val_loss": 0.4576}, history=hist)
    assert d and d.reason == "val_loss dropped 12.0% since step 200 (0.52 → 0.4576)"
    assert MetricChange("val_loss", abs=0.05).should_save(300, {"val_loss": 0.58}, history=hist).reason == (
        "val_loss rose by 0.06 since step 200 (0.52 → 0.58)"
    )
    best = MetricChange("val_loss", best=True)
    assert not best.should_save(300, {"val_loss": 0.51}, history=hist)
    assert best.should_save(300, {"val_loss": 0.49}, history=hist).reason == (
        "new best val_loss 0.49 (was 0.5 at step 100)"
    )
    acc = MetricChange("accuracy", best=True)  # higher is better for names without loss/err
    assert acc.should_save(3, {"accuracy": 0.9}, history=[Entry(1, metrics={"accuracy": 0.8})])
    assert not MetricChange("accuracy", best=True, mode="min").should_save(
        3, {"accuracy": 0.9}, history=[Entry(1, metrics={"accuracy": 0.8})]
    )
    # The first value is the baseline: saved. No value now: nothing to decide on.
    assert best.should_save(1, {"val_loss": 3.0}).reason == "first val_loss value (3)"
    assert not best.should_save(1, {"other": 3.0})
    assert not best.should_save(1, {"val_loss": float("nan")})


def test_weight_change_overall_and_per_module() -> None:
    p = WeightChange(0.05)
    assert not p.should_save(10)  # not measured
    assert not p.should_save(10, weight_change={OVERALL: 0.01, "head": 0.2})
    d = p.should_save(10, weight_change={OVERALL: 0.06}, history=[Entry(4)])
    assert d and d.reason == "weights moved 6.00% (relative L2) since step 4"
    pm = WeightChange(0.05, per_module=True)
    d = pm.should_save(10, weight_change={OVERALL: 0.01, "head": 0.2, "body": 0.01})
    assert d and d.reasons == ("module head moved 20.00% (relative L2) since the start",)


# ------------------------------------------------------------------------------------------- combinators
def test_any_and_all() -> None:
    p = EverySteps(10) | MetricChange("loss", best=True)
    assert isinstance(p, AnyOf)
    d = p.should_save(20, {"loss": 1.0}, prev_step=19, history=[Entry(10, metrics={"loss": 2.0})])
    assert d.reasons == ("every 10 steps (step 20)", "new best loss 1 (was 2 at step 10)")
    both = EverySteps(10) & WeightChange(0.1)
    assert isinstance(both, AllOf)
    assert not both.should_save(20, prev_step=19, weight_change={OVERALL: 0.05})
    d = both.should_save(20, prev_step=19, weight_change={OVERALL: 0.15})
    assert d.reason == "every 10 steps (step 20) and weights moved 15.00% (relative L2) since the start"
    assert AnyOf((AnyOf((First(), Last())), EverySteps(3))).policies == (First(), Last(), EverySteps(3))
    assert bool(Decision.yes("x")) and not Decision.no()


policies = st.deferred(
    lambda: st.one_of(
        st.builds(EverySteps, st.integers(1, 1000), offset=st.integers(0, 10)),
        st.builds(EveryEpochs, st.integers(1, 10)),
        st.builds(EverySeconds, st.floats(0.5, 1e5)),
        st.builds(LogSpaced, st.sampled_from([1.5, 2.0, 10.0]), until=st.none() | st.integers(1, 1000),
                  then_every=st.none() | st.integers(1, 1000), zero=st.booleans()),
        st.just(First()),
        st.just(Last()),
        st.builds(MetricChange, st.sampled_from(["val_loss", "acc", "eval/top1"]), rel=st.none() | st.floats(0.01, 1),
                  abs=st.floats(0.001, 1), best=st.booleans(), mode=st.sampled_from([None, "min", "max"])),
        st.builds(WeightChange, st.floats(0.001, 1), per_module=st.booleans(),
                  modules=st.none() | st.tuples(st.sampled_from(["visual", "text"]))),
        st.builds(lambda ps: AnyOf(tuple(ps)), st.lists(policies, min_size=1, max_size=3)),
        st.builds(lambda ps: AllOf(tuple(ps)), st.lists(policies, min_size=1, max_size=3)),
    )
)  # fmt: skip


@given(policies)
@settings(max_examples=200, deadline=None)
def test_json_round_trip(p: SavePolicy) -> None:
    data = json.loads(json.dumps(p.to_json()))
    assert save_policy_from_json(data) == p
    assert parse_save_policy(data) == p


def test_text_form() -> None:
    p = parse_save_policy("log:2:then=1000, best:val_loss, weights:5%:per_module=true, steps:100&weights:0.01, last")
    assert p == AnyOf(
        (
            LogSpaced(2.0, then_every=1000),
            MetricChange("val_loss", best=True),
            WeightChange(0.05, per_module=True),
            AllOf((EverySteps(100), WeightChange(0.01))),
            Last(),
        )
    )
    assert parse_save_policy("metric:val_loss:rel=10%:abs=0.2") == MetricChange("val_loss", rel=0.1, abs=0.2)
    assert parse_save_policy("minutes:30") == EverySeconds(1800)
    assert parse_save_policy("epochs:1") == EveryEpochs(1)
    assert parse_save_policy("weights:0.1:modules=visual|text") == WeightChange(
        0.1, per_module=True, modules=("visual", "text")
    )


@pytest.mark.parametrize(
    "spec",
    ["", "every", "every:0", "steps:x", "log:1", "metric", "metric:val_loss", "weights", "weights:-1", "nope:3",
     "steps:3:bogus=1", "best:loss:rel=1:2", "last,,first"],
)  # fmt: skip
def test_bad_text_is_one_clear_error(spec: str) -> None:
    with pytest.raises(InvalidPolicyError) as exc:
        parse_save_policy(spec)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "data", [{}, {"kind": "nope"}, {"kind": "every_steps", "n": 0}, {"kind": "every_steps", "n": 1, "x": 2},
             {"kind": "any", "policies": []}, {"kind": "log_spaced", "base": 1.0}],
)  # fmt: skip
def test_bad_json_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(InvalidPolicyError):
        save_policy_from_json(data)
