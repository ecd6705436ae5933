"""When to save and what to keep: save policies, retention policies, key-checkpoint selection.

Everything here except :mod:`ckptstore.policy.thin` is a pure function of a run's history (a list of
:class:`Entry`), so decisions can be tested, printed and replayed; ``thin`` reads the history from a store and
applies plans to it. docs/policies.md describes every policy, the text form and the selection algorithm.

>>> from ckptstore import policy
>>> p = policy.parse_save_policy("log:2:until=512:then=1000, best:val_loss, last")
>>> bool(p.should_save(64))
True
>>> policy.plan(entries, policy.parse_retention("last:3,best:val_loss"))      # doctest: +SKIP
"""

from ckptstore.policy.history import PIN_TAG, Entry, default_mode, entries_from_infos
from ckptstore.policy.retention import (
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepFirst,
    KeepLast,
    KeepLogSpaced,
    KeepPinned,
    KeepSelect,
    KeepTagged,
    RetentionPlan,
    RetentionPolicy,
    Union,
    parse_retention,
    plan,
    plan_tiers,
    retention_from_json,
)
from ckptstore.policy.save import (
    OVERALL,
    AllOf,
    AnyOf,
    Decision,
    EveryEpochs,
    EverySeconds,
    EverySteps,
    First,
    Last,
    LogSpaced,
    MetricChange,
    Now,
    SavePolicy,
    WeightChange,
    parse_save_policy,
    save_policy_from_json,
    simulate,
)
from ckptstore.policy.select import Choice, select
from ckptstore.policy.spec import InvalidPolicyError

__all__ = [
    "OVERALL",
    "PIN_TAG",
    "AllOf",
    "AnyOf",
    "Choice",
    "Decision",
    "Entry",
    "EveryEpochs",
    "EverySeconds",
    "EverySteps",
    "First",
    "InvalidPolicyError",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepFirst",
    "KeepLast",
    "KeepLogSpaced",
    "KeepPinned",
    "KeepSelect",
    "KeepTagged",
    "Last",
    "LogSpaced",
    "MetricChange",
    "Now",
    "RetentionPlan",
    "RetentionPolicy",
    "SavePolicy",
    "Union",
    "WeightChange",
    "default_mode",
    "entries_from_infos",
    "parse_retention",
    "parse_save_policy",
    "plan",
    "plan_tiers",
    "retention_from_json",
    "save_policy_from_json",
    "select",
    "simulate",
]
