"""Checkpoint references: ``run@step``, ``run@step=N``, ``run@epoch=N``, ``run@latest``, ``run@first``,
``run@tag:NAME``, ``run@best:METRIC`` (lowest for names containing ``loss``/``err``, else highest; force with
``best:METRIC:min`` / ``:max``). A bare ``run`` means ``run@latest``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import CheckpointNotFoundError, InvalidReferenceError
from ckptstore.format.names import check_run_name

_SEL = re.compile(
    r"^(?:(?P<step>\d+)|step=(?P<step2>\d+)|epoch=(?P<epoch>\d+)|(?P<kw>latest|first)"
    r"|tag:(?P<tag>[^\s]+)|best:(?P<metric>[A-Za-z0-9_./\-]+?)(?::(?P<dir>min|max))?)$"
)


@dataclass(frozen=True)
class Ref:
    run: str
    kind: str  # "step", "epoch", "latest", "first", "tag", "best"
    value: str | int | None = None
    direction: str | None = None

    def __str__(self) -> str:
        if self.kind in ("latest", "first"):
            return f"{self.run}@{self.kind}"
        if self.kind == "step":
            return f"{self.run}@{self.value}"
        if self.kind == "epoch":
            return f"{self.run}@epoch={self.value}"
        if self.kind == "tag":
            return f"{self.run}@tag:{self.value}"
        return f"{self.run}@best:{self.value}" + (f":{self.direction}" if self.direction else "")


def _number(digits: str, text: str) -> int:
    """A step or epoch number; thousands of digits (found by fuzzing) overflowed int()'s digit limit."""
    if len(digits) > 20:  # more than any step a store takes (format/names.py MAX_STEP)
        raise InvalidReferenceError(f"the number in reference {text[:60]!r}... has {len(digits)} digits",
                                    hint="a step or epoch is an integer below 2**63")  # fmt: skip
    return int(digits)


def parse_ref(text: str) -> Ref:
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError(
            f"empty checkpoint reference {text!r}", hint="write RUN, RUN@STEP, RUN@latest, RUN@epoch=N ..."
        )
    run, sep, sel = text.partition("@")
    try:
        check_run_name(run)
    except Exception:
        raise InvalidReferenceError(
            f"bad run name in reference {text!r}", hint="write RUN@STEP, RUN@latest, RUN@epoch=N ..."
        ) from None
    if not sep:
        return Ref(run, "latest")
    m = _SEL.fullmatch(sel)  # not match(): its "$" would accept a trailing newline
    if not m:
        raise InvalidReferenceError(
            f"cannot parse {sel!r} in reference {text!r}",
            hint="after '@' write a step (1200 or step=1200), epoch=N, latest, first, tag:NAME or best:METRIC",
        )
    if m["step"] or m["step2"]:
        return Ref(run, "step", _number(m["step"] or m["step2"], text))
    if m["epoch"]:
        return Ref(run, "epoch", _number(m["epoch"], text))
    if m["kw"]:
        return Ref(run, m["kw"])
    if m["tag"]:
        return Ref(run, "tag", m["tag"])
    return Ref(run, "best", m["metric"], m["dir"])


def _metric(meta: Mapping[str, Any], name: str) -> float | None:
    node: Any = meta.get("metrics", {})
    val = node.get(name) if isinstance(node, Mapping) else None
    if val is None:  # allow dotted paths into the whole metadata, e.g. best:metrics.val/loss
        node = meta
        for part in name.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        val = node
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        return None
    return float(val)


def resolve(ref: Ref, entries: Sequence[Mapping[str, Any]]) -> int:
    """Pick a step among ``entries`` (dicts with ``step`` and ``metadata``, in step order)."""
    if not entries:
        raise CheckpointNotFoundError(f"run {ref.run!r} has no checkpoints", ref=str(ref))
    if ref.kind == "latest":
        return int(entries[-1]["step"])
    if ref.kind == "first":
        return int(entries[0]["step"])
    if ref.kind == "step":
        for e in entries:
            if e["step"] == ref.value:
                return int(e["step"])
        raise CheckpointNotFoundError(
            f"no checkpoint at step {ref.value}", ref=str(ref), hint=f"`ckpt ls {ref.run}` lists the steps"
        )
    if ref.kind == "epoch":
        hits = [e for e in entries if e.get("metadata", {}).get("epoch") == ref.value]
        if not hits:
            raise CheckpointNotFoundError(f"no checkpoint at epoch {ref.value}", ref=str(ref))
        return int(hits[-1]["step"])
    if ref.kind == "tag":
        hits = [e for e in entries if ref.value in e.get("metadata", {}).get("tags", [])]
        if not hits:
            raise CheckpointNotFoundError(f"no checkpoint tagged {ref.value!r}", ref=str(ref))
        return int(hits[-1]["step"])
    name = str(ref.value)
    direction = ref.direction or ("min" if re.search(r"loss|err|perplex", name) else "max")
    scored = [(v, e) for e in entries if (v := _metric(e.get("metadata", {}), name)) is not None]
    if not scored:
        raise CheckpointNotFoundError(f"no checkpoint records metric {name!r}", ref=str(ref))
    pick = min(scored, key=lambda t: t[0]) if direction == "min" else max(scored, key=lambda t: t[0])
    return int(pick[1]["step"])
