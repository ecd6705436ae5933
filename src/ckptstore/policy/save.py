"""When to save: schedules and triggers, composable, serialisable to JSON, each answering with a reason.

A save policy is asked once per step (or per epoch) whether to save *now*, given what it can see of the present
(:class:`Now`: step, epoch, metrics, elapsed time, the previous call's step, how far the weights moved) and the
checkpoints already saved (a list of :class:`~ckptstore.policy.history.Entry`). The answer is a
:class:`Decision` — ``bool(decision)`` says whether, ``decision.reason`` says why ("val_loss dropped 12.0% since
step 300 (0.52 → 0.46)"), and the recorder writes that reason into the checkpoint's metadata.

Policies hold no state: everything they need is in the two arguments, so a decision can be replayed from a run's
history. Schedules fire when one of their steps lies in ``(previous call's step, this step]``, so a loop that
calls every step saves exactly on the schedule and a loop that calls less often never skips a scheduled save.

A policy is a small frozen dataclass; ``|`` and ``&`` combine them (:class:`AnyOf`, :class:`AllOf`),
``to_json()``/:func:`save_policy_from_json` round-trip them, and :func:`parse_save_policy` reads the short text
form (``"log:2:until=512:then=1000, best:val_loss, weights:0.05, last"``). A worked implementation of a policy::

    @dataclass(frozen=True)
    class EveryThousand(SavePolicy):
        kind: ClassVar[str] = "every_thousand"

        def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
            return Decision.yes("a round thousand") if now.step % 1000 == 0 else Decision.no()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ckptstore.policy.history import Entry, default_mode
from ckptstore.policy.spec import InvalidPolicyError, Term, fields_json, parse_bool, parse_term, split_terms

__all__ = [
    "OVERALL",
    "AllOf",
    "AnyOf",
    "Decision",
    "EveryEpochs",
    "EverySeconds",
    "EverySteps",
    "First",
    "Last",
    "LogSpaced",
    "MetricChange",
    "Now",
    "SavePolicy",
    "WeightChange",
    "parse_save_policy",
    "save_policy_from_json",
    "simulate",
]

#: Key of the whole-model value in ``Now.weight_change`` (the other keys are module names).
OVERALL = "*"


@dataclass(frozen=True)
class Decision:
    """Save or not, and why. ``bool(decision)`` is ``decision.save``."""

    save: bool
    reasons: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.save

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @staticmethod
    def yes(*reasons: str) -> Decision:
        return Decision(True, tuple(reasons))

    @staticmethod
    def no(*reasons: str) -> Decision:
        return Decision(False, tuple(reasons))


@dataclass(frozen=True)
class Now:
    """The present, as a save policy sees it.

    ``prev_step``/``prev_epoch`` are those of the previous call (``None`` on the first call); ``time`` is seconds
    since training started; ``weight_change`` maps :data:`OVERALL` and module names to the relative L2 distance
    of the weights from the last saved checkpoint (computed by the recorder's weight tracker, when asked for).
    """

    step: int
    epoch: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    time: float | None = None
    prev_step: int | None = None
    prev_epoch: float | None = None
    is_last: bool = False
    weight_change: Mapping[str, float] | None = None


class SavePolicy:
    """Base of all save policies: implement :meth:`decide`; the rest (JSON, combinators) comes with it."""

    kind: ClassVar[str] = ""

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        raise NotImplementedError

    def should_save(
        self,
        step: int,
        metrics: Mapping[str, float] | None = None,
        *,
        epoch: float | None = None,
        time: float | None = None,
        prev_step: int | None = None,
        prev_epoch: float | None = None,
        is_last: bool = False,
        weight_change: Mapping[str, float] | None = None,
        history: Sequence[Entry] = (),
    ) -> Decision:
        """Whether to save at ``step`` given the checkpoints saved so far (``history``), and why."""
        now = Now(step, epoch, dict(metrics or {}), time, prev_step, prev_epoch, is_last, weight_change)
        return self.decide(now, list(history))

    def children(self) -> tuple[SavePolicy, ...]:
        return ()

    def walk(self) -> Iterator[SavePolicy]:
        """This policy and every policy inside it."""
        yield self
        for c in self.children():
            yield from c.walk()

    def to_json(self) -> dict[str, Any]:
        return fields_json(self.kind, self)

    def __or__(self, other: SavePolicy) -> AnyOf:
        return AnyOf((self, other))

    def __and__(self, other: SavePolicy) -> AllOf:
        return AllOf((self, other))


# ------------------------------------------------------------------------------------------------ schedules
def _crossed(prev: int | None, value: int, next_after: Callable[[int], int | None]) -> int | None:
    """The scheduled point in ``(prev, value]`` (the first one), or None; on the first call, ``value`` itself."""
    lo = value - 1 if prev is None else prev
    if lo >= value:
        return None
    nxt = next_after(lo)
    return nxt if nxt is not None and nxt <= value else None


@dataclass(frozen=True)
class EverySteps(SavePolicy):
    """Every ``n`` steps: steps ``offset + n``, ``offset + 2n`` ... (step ``offset`` itself is ``First``'s job)."""

    kind: ClassVar[str] = "every_steps"
    n: int
    offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise InvalidPolicyError(f"every_steps: n must be a positive integer, got {self.n!r}")

    def next_after(self, x: int) -> int:
        k = max(1, (x - self.offset) // self.n + 1)
        return self.offset + k * self.n

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        hit = _crossed(now.prev_step, now.step, self.next_after)
        if hit is None:
            return Decision.no()
        return Decision.yes(f"every {self.n} steps (step {hit})")


@dataclass(frozen=True)
class EveryEpochs(SavePolicy):
    """Every ``n`` epochs, counting completed epochs (``epoch`` as open_clip_train records it): n, 2n, ..."""

    kind: ClassVar[str] = "every_epochs"
    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise InvalidPolicyError(f"every_epochs: n must be a positive integer, got {self.n!r}")

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        if now.epoch is None:
            return Decision.no()
        e = math.floor(now.epoch + 1e-9)  # fractional epochs (transformers) count once completed
        prev = None if now.prev_epoch is None else math.floor(now.prev_epoch + 1e-9)
        hit = _crossed(prev, e, lambda x: max(1, x // self.n + 1) * self.n)
        if hit is None:
            return Decision.no()
        return Decision.yes(f"every {self.n} epoch{'s' if self.n > 1 else ''} (epoch {hit})")


@dataclass(frozen=True)
class EverySeconds(SavePolicy):
    """When ``seconds`` of training time have passed since the last save (or since the start)."""

    kind: ClassVar[str] = "every_seconds"
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, int | float) or not self.seconds > 0 or not math.isfinite(self.seconds):
            raise InvalidPolicyError(f"every_seconds: seconds must be a positive number, got {self.seconds!r}")

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        if now.time is None:
            return Decision.no()
        last = next((e.time for e in reversed(history) if e.time is not None), 0.0)
        waited = now.time - last
        if waited >= self.seconds:
            since = "the last save" if history else "the start"
            return Decision.yes(f"{waited:.0f} s since {since} (every {self.seconds:g} s)")
        return Decision.no()


def _ceil(x: float) -> int:
    """⌈x⌉ with a relative tolerance of 1e-9, so 2.0000000000000004 counts as 2."""
    return math.ceil(x - abs(x) * 1e-9)


@dataclass(frozen=True)
class LogSpaced(SavePolicy):
    """Log-spaced steps, then a fixed period (Pythia: 0, 1, 2, 4 ... 512, then 1000, 2000 ...).

    The schedule is: step 0 (when ``zero``); every ``⌈start·base^k⌉`` (k = 0, 1, 2 ...) up to ``until`` —
    unbounded without ``until`` and ``then_every``; ``then_every`` alone means ``until = then_every`` — and then
    every multiple of ``then_every`` above the last log-spaced step.
    """

    kind: ClassVar[str] = "log_spaced"
    base: float = 2.0
    start: int = 1
    until: int | None = None
    then_every: int | None = None
    zero: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.base, int | float) or not self.base > 1 or not math.isfinite(self.base):
            raise InvalidPolicyError(f"log_spaced: base must be a number above 1, got {self.base!r}")
        if not isinstance(self.start, int) or self.start < 1:
            raise InvalidPolicyError(f"log_spaced: start must be a positive integer, got {self.start!r}")
        if self.until is not None and (not isinstance(self.until, int) or self.until < 0):
            raise InvalidPolicyError(f"log_spaced: until must be a non-negative integer, got {self.until!r}")
        if self.then_every is not None and (not isinstance(self.then_every, int) or self.then_every < 1):
            raise InvalidPolicyError(f"log_spaced: then_every must be a positive integer, got {self.then_every!r}")

    @property
    def limit(self) -> int | None:
        """Where the log-spaced part ends (None: never)."""
        return self.until if self.until is not None else self.then_every

    def _log(self) -> Iterator[int]:
        k, last = 0, None
        while True:
            v = _ceil(self.start * self.base**k)
            if self.limit is not None and v > self.limit:
                return
            if v != last:
                yield v
            last, k = v, k + 1

    @property
    def last_log_step(self) -> int:
        """The largest log-spaced step (0 when there is none); the fixed period starts above it."""
        if self.limit is None:
            raise InvalidPolicyError("log_spaced without until or then_every never ends")
        out = 0
        for v in self._log():
            out = v
        return out

    def steps(self, upto: int) -> list[int]:
        """Every scheduled step ≤ ``upto``, in order."""
        out = [0] if self.zero and upto >= 0 else []
        for v in self._log():
            if v > upto:
                break
            if v not in out:
                out.append(v)
        if self.then_every is not None:
            m = (self.last_log_step // self.then_every + 1) * self.then_every
            while m <= upto:
                out.append(m)
                m += self.then_every
        return out

    def next_after(self, x: int) -> int | None:
        if self.zero and x < 0:
            return 0
        for v in self._log():
            if v > x:
                return v
        if self.then_every is None:
            return None
        return (max(x, self.last_log_step) // self.then_every + 1) * self.then_every

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        hit = _crossed(now.prev_step, now.step, self.next_after)
        if hit is None:
            return Decision.no()
        if self.then_every is not None and hit > self.last_log_step:
            return Decision.yes(f"every {self.then_every} steps after the log-spaced start (step {hit})")
        return Decision.yes(f"log-spaced, base {self.base:g} (step {hit})")


@dataclass(frozen=True)
class First(SavePolicy):
    """The run's first checkpoint: fires when nothing has been saved yet."""

    kind: ClassVar[str] = "first"

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        return Decision.no() if history else Decision.yes("first checkpoint of the run")


@dataclass(frozen=True)
class Last(SavePolicy):
    """The last step of training (the caller says so with ``is_last``)."""

    kind: ClassVar[str] = "last"

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        return Decision.yes("end of training") if now.is_last else Decision.no()


# ------------------------------------------------------------------------------------------------- triggers
@dataclass(frozen=True)
class MetricChange(SavePolicy):
    """A watched metric moved since the last checkpoint that recorded it: by at least ``rel`` (relative) or
    ``abs`` (absolute), or (``best``) to a new best. ``mode`` is ``"min"``/``"max"``; by default lower is
    better for names with loss/err/perplex in them. The first value ever seen fires too (there is nothing to
    compare it with, and it is the baseline later changes are measured from)."""

    kind: ClassVar[str] = "metric"
    metric: str
    rel: float | None = None
    abs: float | None = None
    best: bool = False
    mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidPolicyError("metric: a metric name is needed")
        for name in ("rel", "abs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or not v > 0 or not math.isfinite(v)):
                raise InvalidPolicyError(f"metric: {name} must be a positive number, got {v!r}")
        if self.rel is None and self.abs is None and not self.best:
            raise InvalidPolicyError(f"metric {self.metric}: give rel=, abs= or best=true")
        if self.mode not in (None, "min", "max"):
            raise InvalidPolicyError(f"metric: mode must be min or max, got {self.mode!r}")

    @property
    def direction(self) -> str:
        return self.mode or default_mode(self.metric)

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        val = now.metrics.get(self.metric)
        if val is None or not isinstance(val, int | float) or not math.isfinite(val):
            return Decision.no()
        prior = [(e.step, v) for e in history if (v := e.metric(self.metric)) is not None]
        if not prior:
            return Decision.yes(f"first {self.metric} value ({val:.4g})")
        last_step, last = prior[-1]
        change = val - last
        reasons = []
        if self.rel is not None and last != 0 and abs(change) / abs(last) >= self.rel:
            reasons.append(
                f"{self.metric} {'dropped' if change < 0 else 'rose'} {abs(change) / abs(last):.1%} "
                f"since step {last_step} ({last:.4g} → {val:.4g})"
            )
        if self.abs is not None and abs(change) >= self.abs:
            reasons.append(
                f"{self.metric} {'fell' if change < 0 else 'rose'} by {abs(change):.4g} since step {last_step} "
                f"({last:.4g} → {val:.4g})"
            )
        if self.best:
            pick = min if self.direction == "min" else max
            best_step, best = pick(prior, key=lambda t: t[1])
            if (val < best) if self.direction == "min" else (val > best):
                reasons.append(f"new best {self.metric} {val:.4g} (was {best:.4g} at step {best_step})")
        return Decision(bool(reasons), tuple(reasons))


@dataclass(frozen=True)
class WeightChange(SavePolicy):
    """The weights moved far from the last saved checkpoint: relative L2 distance ‖w − w_saved‖ / ‖w_saved‖ of
    the whole model (or, with ``per_module``, of any one module) at least ``threshold``.

    The distance is measured by the recorder's weight tracker (``ckptstore.recorder.WeightTracker``), on the
    device, from a fixed random sample of each tensor's elements (``sample`` per tensor; 0 means every
    element, i.e. a full reference copy). ``modules`` names the module prefixes to report separately (default:
    the top-level modules).
    """

    kind: ClassVar[str] = "weight_change"
    threshold: float
    per_module: bool = False
    modules: tuple[str, ...] | None = None
    sample: int = 4096

    def __post_init__(self) -> None:
        t = self.threshold
        if not isinstance(t, int | float) or not t > 0 or not math.isfinite(t):
            raise InvalidPolicyError(f"weight_change: threshold must be a positive number, got {t!r}")
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(str(m) for m in self.modules))
        if not isinstance(self.sample, int) or self.sample < 0:
            raise InvalidPolicyError(f"weight_change: sample must be a non-negative integer, got {self.sample!r}")

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        wc = now.weight_change
        if not wc:
            return Decision.no()
        since = f" since step {history[-1].step}" if history else " since the start"
        reasons = []
        overall = wc.get(OVERALL)
        if overall is not None and overall >= self.threshold:
            reasons.append(f"weights moved {overall:.2%} (relative L2){since}")
        if self.per_module:
            hits = sorted(((v, k) for k, v in wc.items() if k != OVERALL and v >= self.threshold), reverse=True)
            for v, k in hits[:3]:
                reasons.append(f"module {k} moved {v:.2%} (relative L2){since}")
            if len(hits) > 3:
                reasons.append(f"and {len(hits) - 3} more modules")
        return Decision(bool(reasons), tuple(reasons))


# ---------------------------------------------------------------------------------------------- combinators
@dataclass(frozen=True)
class _Combination(SavePolicy):
    """What :class:`AnyOf` and :class:`AllOf` share: a flat tuple of policies (nested ones of the same kind are
    merged), its children and its JSON."""

    policies: tuple[SavePolicy, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", _flat(self.policies, type(self)))

    def children(self) -> tuple[SavePolicy, ...]:
        return self.policies

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "policies": [p.to_json() for p in self.policies]}


@dataclass(frozen=True)
class AnyOf(_Combination):
    """Save when any of the policies says so; the reasons of all that do are recorded."""

    kind: ClassVar[str] = "any"

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        reasons: list[str] = []
        for p in self.policies:
            d = p.decide(now, history)
            if d:
                reasons.extend(d.reasons)
        return Decision(bool(reasons), tuple(reasons))


@dataclass(frozen=True)
class AllOf(_Combination):
    """Save only when every one of the policies says so (``every:100 & weights:0.01``)."""

    kind: ClassVar[str] = "all"

    def decide(self, now: Now, history: Sequence[Entry]) -> Decision:
        reasons: list[str] = []
        for p in self.policies:
            d = p.decide(now, history)
            if not d:
                return Decision.no()
            reasons.extend(d.reasons)
        return Decision(True, (" and ".join(reasons),) if reasons else ())


def _flat(policies: Any, cls: type) -> tuple[SavePolicy, ...]:
    out: list[SavePolicy] = []
    for p in policies:
        if isinstance(p, cls):
            out.extend(p.policies)  # type: ignore[attr-defined]
        elif isinstance(p, SavePolicy):
            out.append(p)
        else:
            raise InvalidPolicyError(f"{cls.__name__} takes save policies, got {type(p).__name__}")
    if not out:
        raise InvalidPolicyError(f"{cls.__name__} needs at least one policy")
    return tuple(out)


# ------------------------------------------------------------------------------------------ JSON, text form
SAVE_POLICIES: dict[str, type[SavePolicy]] = {
    c.kind: c
    for c in (EverySteps, EveryEpochs, EverySeconds, LogSpaced, First, Last, MetricChange, WeightChange, AnyOf, AllOf)
}


def save_policy_from_json(data: Mapping[str, Any]) -> SavePolicy:
    """The policy a ``to_json()`` dict describes."""
    if not isinstance(data, Mapping) or "kind" not in data:
        raise InvalidPolicyError(f"not a save policy: {data!r:.100}", hint='expected {"kind": ..., ...}')
    cls = SAVE_POLICIES.get(str(data["kind"]))
    if cls is None:
        known_kinds = ", ".join(SAVE_POLICIES)
        raise InvalidPolicyError(f"unknown save policy kind {data['kind']!r}", hint=f"known: {known_kinds}")
    args = {k: v for k, v in data.items() if k != "kind"}
    if cls in (AnyOf, AllOf):
        return cls(tuple(save_policy_from_json(p) for p in args.get("policies", ())))
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidPolicyError(f"save policy {data['kind']!r} has no field {unknown[0]!r}")
    if "modules" in args and args["modules"] is not None:
        args["modules"] = tuple(args["modules"])
    try:
        return cls(**args)
    except TypeError as exc:
        raise InvalidPolicyError(f"save policy {data['kind']!r}: {exc}") from None


def _opt_int(term: Term, key: str) -> int | None:
    raw = term.options.get(key)
    return None if raw is None else term.to_int(raw, minimum=0)


def _term_policy(term: Term) -> SavePolicy:
    n = term.name
    if n in ("steps", "every", "every_steps"):
        term.check_options(("offset",))
        return EverySteps(term.int_arg(0), offset=_opt_int(term, "offset") or 0)
    if n in ("epochs", "every_epochs"):
        term.check_options(())
        return EveryEpochs(term.int_arg(0))
    if n in ("seconds", "every_seconds", "minutes"):
        term.check_options(())
        raw = term.arg(0)
        if raw is None:
            raise term.fail("how many seconds?")
        return EverySeconds(term.to_float(raw) * (60 if n == "minutes" else 1))
    if n in ("log", "log_spaced"):
        term.check_options(("until", "then", "start", "zero"))
        base = term.to_float(term.arg(0, "2") or "2")
        if base <= 1:
            raise term.fail("the base must be above 1")
        return LogSpaced(
            base,
            start=_opt_int(term, "start") or 1,
            until=_opt_int(term, "until"),
            then_every=_opt_int(term, "then"),
            zero=parse_bool(term.options.get("zero", "true")),
        )
    if n == "first":
        term.check_options(())
        return First()
    if n == "last":
        term.check_options(())
        return Last()
    if n in ("metric", "best"):
        term.check_options(("rel", "abs", "best", "mode"))
        metric = term.arg(0)
        if not metric:
            raise term.fail("which metric?", hint=f"{n}:val_loss")
        rel, ab = term.options.get("rel"), term.options.get("abs")
        best = n == "best" or parse_bool(term.options.get("best", "false"))
        mode = term.options.get("mode") or (term.arg(1) if term.arg(1) in ("min", "max") else None)
        return MetricChange(
            metric,
            rel=None if rel is None else _fraction(term, rel),
            abs=None if ab is None else term.to_float(ab),
            best=best,
            mode=mode,
        )
    if n in ("weights", "weight_change"):
        term.check_options(("per_module", "modules", "sample"))
        raw = term.arg(0)
        if raw is None:
            raise term.fail("which threshold?", hint="weights:0.05 (5% relative L2 change)")
        mods = term.options.get("modules")
        return WeightChange(
            _fraction(term, raw),
            per_module=parse_bool(term.options.get("per_module", "true" if mods else "false")),
            modules=tuple(m for m in mods.split("|") if m) if mods else None,
            sample=_opt_int(term, "sample") if "sample" in term.options else 4096,  # type: ignore[arg-type]
        )
    raise term.fail(
        f"unknown save policy {n!r}",
        hint="use steps:N, epochs:N, seconds:S, log[:BASE][:until=N][:then=N], first, last, "
        "metric:NAME:rel=0.1, best:NAME, weights:0.05",
    )


def _fraction(term: Term, raw: str) -> float:
    """``0.1`` or ``10%``."""
    raw = raw.strip()
    return term.to_float(raw[:-1]) / 100 if raw.endswith("%") else term.to_float(raw)


def parse_save_policy(spec: str | Mapping[str, Any] | SavePolicy) -> SavePolicy:
    """A save policy from its text form, its JSON form, or as given."""
    if isinstance(spec, SavePolicy):
        return spec
    if isinstance(spec, Mapping):
        return save_policy_from_json(spec)
    alternatives = []
    for text in split_terms(spec):
        parts = [_term_policy(parse_term(t)) for t in text.split("&")]
        alternatives.append(parts[0] if len(parts) == 1 else AllOf(tuple(parts)))
    return alternatives[0] if len(alternatives) == 1 else AnyOf(tuple(alternatives))


def simulate(
    policy: SavePolicy,
    steps: Sequence[int],
    *,
    metrics: Callable[[int], Mapping[str, float]] | None = None,
    last: bool = True,
) -> list[tuple[int, str]]:
    """Call ``policy`` at each of ``steps`` in turn (saving when it says so) and return ``(step, reason)`` of every
    save: what a run with this policy would keep. ``metrics(step)`` supplies the metrics seen at a step."""
    history: list[Entry] = []
    out = []
    prev: int | None = None
    for i, s in enumerate(steps):
        m = dict(metrics(s)) if metrics else {}
        d = policy.decide(Now(s, None, m, None, prev, None, last and i == len(steps) - 1), history)
        if d:
            history.append(Entry(s, metrics=m, reason=d.reason))
            out.append((s, d.reason))
        prev = s
    return out
