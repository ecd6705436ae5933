"""A run's history as the policies see it: one :class:`Entry` per checkpoint, built from metadata alone.

Policies never touch a store. They are handed a list of entries (step order) and answer with steps, so every
decision is a pure function of the history and can be tested, printed and replayed. :func:`entries_from_infos`
builds the list from ``Store.checkpoints()`` rows; ``ckptstore.policy.thin`` adds the weight-path coordinate.

Metadata keys read here (written by the recorder, the integrations and ``ckpt watch``; see docs/policies.md):
``epoch``, ``metrics`` (name → number), ``tags`` (``pinned`` pins), ``pinned`` (bool), ``wall_time`` /
``elapsed``, ``save_reason`` and ``trajectory.path_length`` (cumulative L2 distance travelled by the weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PATH_KEY",
    "PIN_TAG",
    "Entry",
    "default_mode",
    "entries_from_infos",
    "metric_names",
]

#: The tag that pins a checkpoint: no retention policy ever removes it.
PIN_TAG = "pinned"
#: Metadata key holding the weight-path record (``{"path_length": ..., "prev_step": ..., "distance": ...}``).
PATH_KEY = "trajectory"

_LOWER_IS_BETTER = re.compile(r"loss|err|perplex")  # the same rule as ``RUN@best:METRIC`` (refs.py)


def default_mode(metric: str) -> str:
    """``"min"`` for names that read like a loss or an error (``val_loss``, ``top1_err``, ``perplexity``), else
    ``"max"`` — the rule ``RUN@best:METRIC`` uses, so "best" means the same everywhere."""
    return "min" if _LOWER_IS_BETTER.search(metric) else "max"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Entry:
    """One checkpoint of a run: the facts policies decide on.

    ``path`` is the cumulative length of the path the model weights travelled from the run's first checkpoint
    (L2, summed over consecutive checkpoints); ``None`` when unknown. ``time`` is seconds since the run started.
    """

    step: int
    epoch: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    pinned: bool = False
    stored_bytes: int = 0
    path: float | None = None
    time: float | None = None
    reason: str | None = None

    def metric(self, name: str) -> float | None:
        return self.metrics.get(name)

    @property
    def is_pinned(self) -> bool:
        """Pinned by the flag or by the ``pinned`` tag."""
        return self.pinned or PIN_TAG in self.tags

    @property
    def ref_suffix(self) -> str:
        return f"@{self.step}"

    def label(self) -> str:
        """``step 1200`` or ``epoch 3 (step 1200)``, for messages."""
        if self.epoch is not None and self.epoch != self.step:
            ep = int(self.epoch) if float(self.epoch).is_integer() else self.epoch
            return f"epoch {ep} (step {self.step})"
        if self.epoch is not None:
            return f"epoch {self.step}"
        return f"step {self.step}"

    @classmethod
    def from_metadata(cls, step: int, metadata: Mapping[str, Any], *, stored_bytes: int = 0) -> Entry:
        metrics: dict[str, float] = {}
        raw = metadata.get("metrics")
        if isinstance(raw, Mapping):
            for k, v in raw.items():
                f = _number(v)
                if f is not None:
                    metrics[str(k)] = f
        loss = metadata.get("loss")
        if isinstance(loss, Mapping):  # the metadata schema's training loss: {"last": ..., "avg": ...}
            for k in ("avg", "last"):
                f = _number(loss.get(k))
                if f is not None and f"loss.{k}" not in metrics:
                    metrics[f"loss.{k}"] = f
        tags = metadata.get("tags")
        tag_tuple = tuple(str(t) for t in tags) if isinstance(tags, list | tuple) else ()
        traj = metadata.get(PATH_KEY)
        path = _number(traj.get("path_length")) if isinstance(traj, Mapping) else None
        time = _number(metadata.get("elapsed"))
        if time is None:
            time = _number(metadata.get("wall_time"))
        reason = metadata.get("save_reason")
        epoch = _number(metadata.get("epoch"))
        return cls(
            step=int(step),
            epoch=epoch,
            metrics=metrics,
            tags=tag_tuple,
            pinned=bool(metadata.get("pinned") is True or PIN_TAG in tag_tuple),
            stored_bytes=int(stored_bytes),
            path=path,
            time=time,
            reason=reason if isinstance(reason, str) else None,
        )


def entries_from_infos(infos: Iterable[Any]) -> list[Entry]:
    """Entries from ``Store.checkpoints(run)`` rows (anything with ``step``, ``metadata``, ``stored_bytes``)."""
    out = [Entry.from_metadata(i.step, i.metadata or {}, stored_bytes=i.stored_bytes) for i in infos]
    return sorted(out, key=lambda e: e.step)


def metric_names(entries: Sequence[Entry], *, min_share: float = 0.5) -> list[str]:
    """Metrics recorded by at least ``min_share`` of the entries, in first-seen order."""
    counts: dict[str, int] = {}
    for e in entries:
        for k in e.metrics:
            counts[k] = counts.get(k, 0) + 1
    need = max(1, math.ceil(min_share * len(entries)))
    return [k for k, n in counts.items() if n >= need]
