"""The short text form of policies, shared by the command line and by configs: ``last:3``, ``best:val_loss:2``,
``log:2:until=512:then=1000``, ``weights:0.05:per_module=true``.

A term is a name, then ``:``-separated arguments, each either positional or ``key=value``. Several terms are
joined with ``,`` (any of them; for retention: the union); for save policies ``a&b`` means both must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ckptstore.errors import CkptStoreError

__all__ = ["InvalidPolicyError", "Term", "fields_json", "parse_bool", "parse_terms", "split_terms"]


class InvalidPolicyError(CkptStoreError, ValueError):
    """A save or retention policy is malformed (text form, JSON form or arguments)."""


def fields_json(kind: str, policy: Any) -> dict[str, Any]:
    """The JSON form of a policy dataclass: ``kind``, then each field (tuples as lists). Save and retention
    policies both write theirs with it."""
    out: dict[str, Any] = {"kind": kind}
    for f in fields(policy):
        value = getattr(policy, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class Term:
    name: str
    args: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    def arg(self, i: int, default: str | None = None) -> str | None:
        return self.args[i] if i < len(self.args) else default

    def fail(self, message: str, hint: str | None = None) -> InvalidPolicyError:
        return InvalidPolicyError(f"policy {self.text!r}: {message}", hint=hint)

    def int_arg(self, i: int, default: int | None = None, *, minimum: int = 1) -> int:
        raw = self.arg(i)
        if raw is None:
            if default is None:
                raise self.fail(f"argument {i + 1} (an integer) is missing")
            return default
        return self.to_int(raw, minimum=minimum)

    def to_int(self, raw: str, *, minimum: int = 1) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise self.fail(f"{raw!r} is not an integer") from None
        if value < minimum:
            raise self.fail(f"{value} is below {minimum}")
        return value

    def to_float(self, raw: str, *, positive: bool = True) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(f"{raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
            raise self.fail(f"{raw!r} must be a finite number" + (" above 0" if positive else ""))
        return value

    def check_options(self, allowed: tuple[str, ...]) -> None:
        extra = sorted(set(self.options) - set(allowed))
        if extra:
            raise self.fail(
                f"unknown option {extra[0]!r}", hint=f"options: {', '.join(allowed)}" if allowed else "it takes none"
            )


def parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise InvalidPolicyError(f"{raw!r} is not true or false")


def split_terms(text: str) -> list[str]:
    """``"last:3, best:loss"`` → ``["last:3", "best:loss"]``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidPolicyError(f"empty policy {text!r}", hint="e.g. last:3 or best:val_loss:2")
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise InvalidPolicyError(f"empty term in policy {text!r}")
    return parts


def parse_term(text: str) -> Term:
    pieces = text.strip().split(":")
    name = pieces[0].strip().lower()
    if not name:
        raise InvalidPolicyError(f"policy term {text!r} has no name")
    args: list[str] = []
    options: dict[str, str] = {}
    for p in pieces[1:]:
        key, eq, value = p.partition("=")
        if eq:
            if not key.strip():
                raise InvalidPolicyError(f"policy term {text!r}: option without a name")
            options[key.strip().lower().replace("-", "_")] = value.strip()
        elif options:
            raise InvalidPolicyError(f"policy term {text!r}: positional argument {p!r} after key=value options")
        else:
            args.append(p.strip())
    return Term(name, tuple(args), options, text.strip())


def parse_terms(text: str) -> list[Term]:
    return [parse_term(t) for t in split_terms(text)]
