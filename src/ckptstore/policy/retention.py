"""What to keep: retention policies, their union, and the thinning plan — pure functions of the history.

A retention policy looks at a run's checkpoints (:class:`~ckptstore.policy.history.Entry`, step order) and
names the steps it keeps, each with a reason. Several policies keep the union of what each keeps.
:func:`plan` turns policies into a :class:`RetentionPlan` (keep / drop, reasons, bytes), with two guarantees:

* **Pinned checkpoints** (tag ``pinned``) and the **latest** checkpoint (the resume point) are always kept.
* **Idempotent**: the plan is iterated to a fixed point — the policies are applied again to what they kept until
  nothing more goes — so thinning an already thinned run removes nothing. Each policy here is also *stable
  under thinning* on its own (what it keeps from a set, it keeps from any subset that still holds it): last-N,
  best-k, every-N and log-spaced by construction; selection given fixed coordinates.

Text form (``ckpt thin --keep``): ``last:N``, ``first[:N]``, ``best:METRIC[:K][:min|max]``, ``every:N`` (steps),
``log[:BASE]``, ``tagged[:TAG]``, ``pinned``, ``select:N[:metric=NAME]``; several, comma-separated or repeated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ckptstore.policy.history import Entry, default_mode
from ckptstore.policy.select import select
from ckptstore.policy.spec import InvalidPolicyError, Term, fields_json, parse_terms

__all__ = [
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepFirst",
    "KeepLast",
    "KeepLogSpaced",
    "KeepPinned",
    "KeepSelect",
    "KeepTagged",
    "RetentionPlan",
    "RetentionPolicy",
    "Union",
    "parse_retention",
    "plan",
    "plan_tiers",
    "retention_from_json",
]


class RetentionPolicy:
    """Base of retention policies: implement :meth:`keep` (step → reason for each kept entry).

    A worked implementation::

        @dataclass(frozen=True)
        class KeepEven(RetentionPolicy):
            kind: ClassVar[str] = "even"

            def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
                return {e.step: "an even step" for e in entries if e.step % 2 == 0}
    """

    kind: ClassVar[str] = ""
    #: True when the policy uses ``Entry.path`` (the weight path), which costs reading the weights to compute.
    needs_paths: ClassVar[bool] = False

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return fields_json(self.kind, self)


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


@dataclass(frozen=True)
class KeepLast(RetentionPolicy):
    """The newest ``n`` checkpoints."""

    kind: ClassVar[str] = "last"
    n: int

    def __post_init__(self) -> None:
        _positive(self.kind, self.n)

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        newest = sorted(entries, key=lambda e: e.step)[-self.n :]
        return {e.step: f"last {self.n} ({_ordinal(len(newest) - i)} newest)" for i, e in enumerate(newest)}


@dataclass(frozen=True)
class KeepFirst(RetentionPolicy):
    """The oldest ``n`` checkpoints (the initialisation, usually)."""

    kind: ClassVar[str] = "first"
    n: int = 1

    def __post_init__(self) -> None:
        _positive(self.kind, self.n)

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        oldest = sorted(entries, key=lambda e: e.step)[: self.n]
        if self.n == 1:
            return {e.step: "first checkpoint" for e in oldest}
        return {e.step: f"first {self.n} ({_ordinal(i + 1)} oldest)" for i, e in enumerate(oldest)}


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """The ``k`` best checkpoints by a metric (lowest for loss/err/perplex names unless ``mode`` says); ties go to
    the earlier step. Checkpoints without the metric are never "best"."""

    kind: ClassVar[str] = "best"
    metric: str
    k: int = 1
    mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidPolicyError("best: which metric?")
        _positive(self.kind, self.k)
        if self.mode not in (None, "min", "max"):
            raise InvalidPolicyError(f"best: mode must be min or max, got {self.mode!r}")

    @property
    def direction(self) -> str:
        return self.mode or default_mode(self.metric)

    def ranked(self, entries: Sequence[Entry]) -> list[tuple[float, Entry]]:
        scored = [(v, e) for e in entries if (v := e.metric(self.metric)) is not None]
        sign = 1.0 if self.direction == "min" else -1.0
        return sorted(scored, key=lambda t: (sign * t[0], t[1].step))

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        top = self.ranked(entries)[: self.k]
        word = "lowest" if self.direction == "min" else "highest"
        return {
            e.step: (f"best {self.metric} ({word}: {v:.4g})" if self.k == 1 else
                     f"best {self.k} by {self.metric} ({_ordinal(i + 1)}, {v:.4g})")
            for i, (v, e) in enumerate(top)
        }  # fmt: skip


def _first_at_or_after(steps: Sequence[int], targets: Sequence[float]) -> dict[int, float]:
    """For each target, the smallest step ≥ it: step → the (first) target that picked it."""
    out: dict[int, float] = {}
    j = 0
    for t in sorted(targets):
        while j < len(steps) and steps[j] < t:
            j += 1
        if j == len(steps):
            break
        out.setdefault(steps[j], t)
    return out


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """One checkpoint per ``n`` steps: for each multiple of ``n`` (0, n, 2n ...), the first checkpoint at or
    after it. With one checkpoint per epoch and step = epoch (open_clip_train), every n-th epoch."""

    kind: ClassVar[str] = "every"
    n: int

    def __post_init__(self) -> None:
        _positive(self.kind, self.n)

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        steps = sorted(e.step for e in entries)
        if not steps:
            return {}
        targets = [float(self.n * j) for j in range(steps[-1] // self.n + 1)]
        return {
            s: f"every {self.n} steps (step {t:g})" if s == t else f"every {self.n} steps (first at or after {t:g})"
            for s, t in _first_at_or_after(steps, targets).items()
        }


def log_targets(base: float, upto: int) -> list[float]:
    """0 and base^k for k = 0, 1, ... up to ``upto``: the log-spaced retention targets."""
    out = [0.0]
    k = 0
    while base**k <= upto:
        out.append(float(base**k))
        k += 1
    return out


@dataclass(frozen=True)
class KeepLogSpaced(RetentionPolicy):
    """Log-spaced in steps: for each target 0, 1, base, base², ... up to the last step, the first checkpoint at or
    after it. Dense early, sparse late: Pythia's schedule, applied after the fact."""

    kind: ClassVar[str] = "log"
    base: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.base, int | float) or not self.base > 1 or not math.isfinite(self.base):
            raise InvalidPolicyError(f"log: the base must be a number above 1, got {self.base!r}")

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        steps = sorted(e.step for e in entries)
        if not steps:
            return {}
        picked = _first_at_or_after(steps, log_targets(self.base, steps[-1]))
        return {
            s: f"log-spaced, base {self.base:g} (step {t:g})" if s == t else
               f"log-spaced, base {self.base:g} (first at or after {t:g})"
            for s, t in picked.items()
        }  # fmt: skip


@dataclass(frozen=True)
class KeepTagged(RetentionPolicy):
    """Checkpoints carrying ``tag`` (any tag when ``tag`` is None)."""

    kind: ClassVar[str] = "tagged"
    tag: str | None = None

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        if self.tag is None:
            return {e.step: f"tagged {', '.join(e.tags)}" for e in entries if e.tags}
        return {e.step: f"tagged {self.tag}" for e in entries if self.tag in e.tags}


@dataclass(frozen=True)
class KeepAll(RetentionPolicy):
    """Every checkpoint (``--keep-weights all``: the weights of every checkpoint stay)."""

    kind: ClassVar[str] = "all"

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        return {e.step: "all" for e in entries}


@dataclass(frozen=True)
class KeepPinned(RetentionPolicy):
    """Pinned checkpoints (always kept by :func:`plan` anyway; named for completeness)."""

    kind: ClassVar[str] = "pinned"

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        return {e.step: "pinned" for e in entries if e.is_pinned}


@dataclass(frozen=True)
class KeepSelect(RetentionPolicy):
    """The ``n`` key checkpoints of :func:`ckptstore.policy.select.select` (first, last, coverage, change
    points)."""

    kind: ClassVar[str] = "select"
    needs_paths: ClassVar[bool] = True
    n: int
    metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self.kind, self.n)
        if self.metrics is not None:
            object.__setattr__(self, "metrics", tuple(self.metrics))

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        return {c.step: f"select {self.n}: {c.reason}" for c in select(entries, self.n, metrics=self.metrics)}


@dataclass(frozen=True)
class Union(RetentionPolicy):
    """What any of the policies keeps (every reason recorded)."""

    kind: ClassVar[str] = "union"
    policies: tuple[RetentionPolicy, ...] = ()

    def __post_init__(self) -> None:
        flat: list[RetentionPolicy] = []
        for p in self.policies:
            if isinstance(p, Union):
                flat.extend(p.policies)
            elif isinstance(p, RetentionPolicy):
                flat.append(p)
            else:
                raise InvalidPolicyError(f"union takes retention policies, got {type(p).__name__}")
        object.__setattr__(self, "policies", tuple(flat))

    @property
    def needs_paths(self) -> bool:  # type: ignore[override]
        return any(p.needs_paths for p in self.policies)

    def keep(self, entries: Sequence[Entry]) -> dict[int, str]:
        reasons: dict[int, list[str]] = {}
        for p in self.policies:
            for s, r in p.keep(entries).items():
                reasons.setdefault(s, []).append(r)
        return {s: "; ".join(rs) for s, rs in reasons.items()}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "policies": [p.to_json() for p in self.policies]}


def _positive(kind: str, n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidPolicyError(f"{kind}: expected a positive integer, got {n!r}")


# -------------------------------------------------------------------------------------------------- the plan
@dataclass
class RetentionPlan:
    """Which checkpoints stay and which go, with reasons; ``freed_estimate`` is the dropped checkpoints' own
    stored bytes (what deleting them frees, less what re-encoding their dependents takes back)."""

    entries: list[Entry]
    keep: dict[int, list[str]]
    drop: dict[int, str]
    passes: int = 1
    policies: list[dict[str, Any]] = field(default_factory=list)
    #: kept checkpoints that lose their optimizer state (weights-only tier): step → why
    weights_only: dict[int, list[str]] = field(default_factory=dict)
    weights_policies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept(self) -> list[Entry]:
        return [e for e in self.entries if e.step in self.keep]

    @property
    def dropped(self) -> list[Entry]:
        return [e for e in self.entries if e.step in self.drop]

    @property
    def freed_estimate(self) -> int:
        return sum(e.stored_bytes for e in self.dropped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policies": self.policies,
            "keep": [{"step": e.step, "epoch": e.epoch, "stored_bytes": e.stored_bytes,
                      "reasons": self.keep[e.step]} for e in self.kept],
            "drop": [{"step": e.step, "epoch": e.epoch, "stored_bytes": e.stored_bytes, "reason": self.drop[e.step]}
                     for e in self.dropped],
            "freed_estimate": self.freed_estimate,
            "passes": self.passes,
            "weights_policies": self.weights_policies,
            "weights_only": [{"step": s, "reasons": r} for s, r in sorted(self.weights_only.items())],
        }  # fmt: skip


def plan(
    entries: Sequence[Entry],
    policies: RetentionPolicy | Sequence[RetentionPolicy],
    *,
    keep_pinned: bool = True,
    keep_latest: bool = True,
) -> RetentionPlan:
    """Apply retention policies to a run's history (see the module docs for the guarantees)."""
    pols = [policies] if isinstance(policies, RetentionPolicy) else list(policies)
    union = Union(tuple(pols))
    es = sorted(entries, key=lambda e: e.step)
    steps = [e.step for e in es]
    if len(set(steps)) != len(steps):
        raise InvalidPolicyError("the history holds two checkpoints with the same step")
    current = es
    first_reasons: dict[int, list[str]] | None = None
    dropped_later: dict[int, str] = {}
    passes = 0
    while True:
        passes += 1
        reasons: dict[int, list[str]] = {}
        for pol in union.policies:
            for s, r in pol.keep(current).items():
                reasons.setdefault(s, []).append(r)
        if keep_pinned:
            for e in current:
                if e.is_pinned and "pinned" not in reasons.get(e.step, []):
                    reasons.setdefault(e.step, []).append("pinned")
        if keep_latest and current:
            reasons.setdefault(current[-1].step, []).append("latest checkpoint (the resume point)")
        if first_reasons is None:
            first_reasons = reasons
        survivors = [e for e in current if e.step in reasons]
        for e in current:
            if e.step not in reasons and passes > 1:
                dropped_later[e.step] = (
                    "kept on the first pass, dropped when the policies were applied again to what they kept "
                    "(so that thinning again removes nothing)"
                )
        if len(survivors) == len(current):
            break
        current = survivors
    # Survivors of the last pass survived the first one too; its reasons are the informative ones (on the thinned
    # set, selection only says "every checkpoint is kept").
    keep = {e.step: list(first_reasons.get(e.step, [])) for e in current}
    drop = {e.step: dropped_later.get(e.step, "no policy keeps it") for e in es if e.step not in keep}
    return RetentionPlan(es, keep, drop, passes, [p.to_json() for p in pols])


def plan_tiers(
    entries: Sequence[Entry],
    policies: RetentionPolicy | Sequence[RetentionPolicy],
    weights: RetentionPolicy | Sequence[RetentionPolicy],
    *,
    keep_pinned: bool = True,
    keep_latest: bool = True,
) -> RetentionPlan:
    """Two tiers: what ``policies`` keep stays whole; what only ``weights`` keep stays without its optimizer
    state (``RetentionPlan.weights_only``); the rest goes. Pinned checkpoints and the latest stay whole.

    Both tiers are idempotent: the union decides what survives (as :func:`plan`), then ``policies`` alone,
    applied to the survivors, decide which of them stay whole."""
    full = [policies] if isinstance(policies, RetentionPolicy) else list(policies)
    slim = [weights] if isinstance(weights, RetentionPolicy) else list(weights)
    both = plan(entries, [*full, *slim], keep_pinned=keep_pinned, keep_latest=keep_latest)
    whole = plan(both.kept, full, keep_pinned=keep_pinned, keep_latest=keep_latest)
    weights_only: dict[int, list[str]] = {}
    for e in both.kept:
        if e.step not in whole.keep:
            pol_text = ", ".join(str(p.get("kind")) for p in whole.policies)
            weights_only[e.step] = [*both.keep[e.step], f"optimizer state dropped: not kept whole by {pol_text}"]
    keep = {s: (whole.keep[s] if s in whole.keep else both.keep[s]) for s in both.keep}
    return RetentionPlan(both.entries, keep, both.drop, both.passes, whole.policies, weights_only,
                         [p.to_json() for p in slim])  # fmt: skip


# ------------------------------------------------------------------------------------------ JSON, text form
RETENTION_POLICIES: dict[str, type[RetentionPolicy]] = {
    c.kind: c for c in (KeepAll, KeepLast, KeepFirst, KeepBest, KeepEvery, KeepLogSpaced, KeepTagged, KeepPinned,
                        KeepSelect, Union)
}  # fmt: skip


def retention_from_json(data: Mapping[str, Any]) -> RetentionPolicy:
    if not isinstance(data, Mapping) or "kind" not in data:
        raise InvalidPolicyError(f"not a retention policy: {data!r:.100}", hint='expected {"kind": ..., ...}')
    cls = RETENTION_POLICIES.get(str(data["kind"]))
    if cls is None:
        raise InvalidPolicyError(
            f"unknown retention policy kind {data['kind']!r}", hint=f"known: {', '.join(RETENTION_POLICIES)}"
        )
    args = {k: v for k, v in data.items() if k != "kind"}
    if cls is Union:
        return Union(tuple(retention_from_json(p) for p in args.get("policies", ())))
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidPolicyError(f"retention policy {data['kind']!r} has no field {unknown[0]!r}")
    try:
        return cls(**args)
    except TypeError as exc:
        raise InvalidPolicyError(f"retention policy {data['kind']!r}: {exc}") from None


def _term_policy(t: Term) -> RetentionPolicy:
    n = t.name
    if n in ("last", "latest"):
        t.check_options(())
        return KeepLast(t.int_arg(0, 1))
    if n == "first":
        t.check_options(())
        return KeepFirst(t.int_arg(0, 1))
    if n == "best":
        t.check_options(("k", "mode"))
        metric = t.arg(0)
        if not metric:
            raise t.fail("which metric?", hint="best:val_loss, best:val_loss:3, best:accuracy:3:max")
        k, mode = 1, t.options.get("mode")
        for a in t.args[1:]:
            if a in ("min", "max"):
                mode = a
            else:
                k = t.to_int(a)
        if "k" in t.options:
            k = t.to_int(t.options["k"])
        return KeepBest(metric, k, mode)
    if n == "every":
        t.check_options(())
        return KeepEvery(t.int_arg(0))
    if n in ("log", "log_spaced"):
        t.check_options(())
        return KeepLogSpaced(t.to_float(t.arg(0, "2") or "2"))
    if n in ("tagged", "tag"):
        t.check_options(())
        return KeepTagged(t.arg(0))
    if n == "pinned":
        t.check_options(())
        return KeepPinned()
    if n in ("all", "every_checkpoint"):
        t.check_options(())
        if t.args:
            raise t.fail("takes no arguments", hint="all")
        return KeepAll()
    if n == "select":
        t.check_options(("metric", "metrics"))
        raw = t.options.get("metric") or t.options.get("metrics")
        return KeepSelect(t.int_arg(0), tuple(raw.split("|")) if raw else None)
    raise t.fail(
        f"unknown retention policy {n!r}",
        hint="use last:N, first[:N], best:METRIC[:K][:min|max], every:N, log[:BASE], tagged[:TAG], pinned, select:N, "
        "all",
    )


def parse_retention(spec: str | Mapping[str, Any] | RetentionPolicy | Sequence[Any]) -> list[RetentionPolicy]:
    """Retention policies from text (``"last:3,best:val_loss"``), JSON, objects, or a list of any of those."""
    if isinstance(spec, RetentionPolicy):
        return [spec]
    if isinstance(spec, Mapping):
        return [retention_from_json(spec)]
    if isinstance(spec, str):
        return [_term_policy(t) for t in parse_terms(spec)]
    out: list[RetentionPolicy] = []
    for s in spec:
        out.extend(parse_retention(s))
    return out
