"""The plain-PyTorch integration: a :class:`Recorder` called once per step (or epoch) that applies a save policy,
writes the reason into each checkpoint's metadata, and optionally thins the run as it goes.

>>> rec = Recorder(store, "run", model=model, optimizer=opt, scheduler=sched,
...                policy="log:2:then=1000, best:val_loss, weights:0.05, last", keep="last:3,best:val_loss")
>>> for step in range(1, steps + 1):
...     train_one_step()
...     rec.step(step, epoch=epoch, metrics={"loss": loss}, is_last=step == steps)   # doctest: +SKIP

The weight-change trigger needs to know how far the weights moved since the last save. :class:`WeightTracker`
measures that on the device, cheaply: it keeps a fixed random sample of each parameter's elements (4096 by
default, so a few hundred KB for a whole model, never a second copy of it) and compares the live weights with the
sample taken at the last save — one fused reduction and one host sync per call.

This module imports torch (``import ckptstore`` does not).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptstore import metadata as md_schema
from ckptstore.asyncsave import SaveHandle
from ckptstore.format import tree
from ckptstore.format.manifest import CheckpointInfo
from ckptstore.policy import thin
from ckptstore.policy.history import PATH_KEY, Entry
from ckptstore.policy.retention import RetentionPlan, RetentionPolicy, parse_retention
from ckptstore.policy.save import OVERALL, Decision, Now, SavePolicy, WeightChange, parse_save_policy
from ckptstore.policy.spec import InvalidPolicyError
from ckptstore.store import Store, open_store
from ckptstore.torch import training_state

__all__ = ["Checkpointer", "Recorder", "WeightTracker", "plain_metrics"]


class WeightTracker:
    """Relative L2 distance ``‖w − w_ref‖ / ‖w_ref‖`` of a model's parameters from a reference (the weights at the
    last :meth:`reset`), overall and per module group.

    Each parameter with more than ``sample`` elements is represented by ``sample`` elements at fixed random
    positions (drawn once, seeded); the squared sums are scaled by ``numel / sample``, which makes them unbiased
    estimates of the full sums. ``sample=0`` tracks every element (an exact distance, at the price of a full copy
    of the parameters on their device). Groups are the top-level modules (``visual``, ``transformer`` ...) or the
    given ``modules`` prefixes (a parameter belongs to the first prefix it starts with; others to ``other``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        sample: int = 4096,
        modules: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self._params: list[tuple[torch.nn.Parameter, torch.Tensor | None, float, int]] = []
        self.groups: list[str] = []
        group_index: dict[str, int] = {}
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            group = _group_of(name, modules)
            if group not in group_index:
                group_index[group] = len(self.groups)
                self.groups.append(group)
            n = p.numel()
            if sample and n > sample:
                idx = torch.randperm(n, generator=gen)[:sample].sort().values.to(p.device)
                self._params.append((p, idx, n / sample, group_index[group]))
            else:
                self._params.append((p, None, 1.0, group_index[group]))
        self._ref: list[torch.Tensor] | None = None

    def _take(self, p: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        flat = p.detach().reshape(-1)
        return flat if idx is None else flat.index_select(0, idx)

    @torch.no_grad()
    def reset(self) -> None:
        """Take the current weights as the reference (call right after a save)."""
        self._ref = [self._take(p, idx).clone() for p, idx, _, _ in self._params]

    @torch.no_grad()
    def distances(self) -> dict[str, float]:
        """``{"*": overall, group: value ...}``; zeros before the first :meth:`reset` (which it then does)."""
        if self._ref is None:
            self.reset()
        assert self._ref is not None
        if not self._params:
            return {OVERALL: 0.0}
        d2: list[torch.Tensor] = []
        r2: list[torch.Tensor] = []
        for (p, idx, scale, _g), ref in zip(self._params, self._ref, strict=True):
            cur = self._take(p, idx).float()
            r = ref.float()
            d2.append((cur - r).square().sum() * scale)
            r2.append(r.square().sum() * scale)
        sums = torch.stack([torch.stack(d2), torch.stack(r2)]).double().cpu().tolist()  # the one host sync
        gd = [0.0] * len(self.groups)
        gr = [0.0] * len(self.groups)
        for (_p, _idx, _s, g), dv, rv in zip(self._params, sums[0], sums[1], strict=True):
            gd[g] += dv
            gr[g] += rv
        out = {OVERALL: _rel(sum(gd), sum(gr))}
        for name, dg, rg in zip(self.groups, gd, gr, strict=True):
            out[name] = _rel(dg, rg)
        return out


def _rel(d2: float, r2: float) -> float:
    if r2 > 0:
        return math.sqrt(d2 / r2)
    return 0.0 if d2 == 0 else math.inf


def _group_of(name: str, modules: Sequence[str] | None) -> str:
    if modules:
        for m in modules:
            if name == m or name.startswith(m + ".") or (m.endswith(".") and name.startswith(m)):
                return m
        return "other"
    return name.split(".", 1)[0]


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as finite Python floats: tensors and numpy scalars via ``.item()``; others dropped."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if hasattr(v, "item") and not isinstance(v, bool | int | float):
            try:
                if getattr(v, "numel", lambda: 1)() != 1:
                    continue
                v = v.item()
            except (TypeError, ValueError, RuntimeError):
                continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            continue
        out[str(k)] = float(v)
    return out


class Recorder:
    """Save checkpoints of a training run into a store when a save policy says so.

    Call :meth:`step` once per step (or per epoch) with the step, the epoch and the metrics known at that point;
    it asks the policy, and when the answer is yes it saves ``model``/``optimizer``/``scheduler``/``scaler``/RNG
    state (``ckptstore.torch.training_state``; or whatever ``state()`` returns), with metadata holding the
    reason (``save_reason``), the policy (``save_policy``), the step, epoch, metrics, elapsed time and the weight
    path (``trajectory``). With ``keep``, retention policies thin the run after every save (online retention;
    pinned checkpoints and the latest are never removed); with ``keep_weights`` as well, what only those keep
    stays weights-only (``keep="last:2", keep_weights="all"``: optimizer state for the newest two).
    :meth:`finish` saves the last step when the policy has a ``last`` term.

    A call for a step that was already saved saves nothing; its metrics, if any are new, are added to that
    checkpoint's metadata (evaluation results often arrive after the step's save).

    With ``async_save`` (the default) a save returns once the state is snapshotted
    (:meth:`ckptstore.Store.save_async`); encoding, the commit and the retention that follows it run in the
    background. A background failure is raised by the next save, :meth:`wait` or :meth:`finish` (which waits).
    """

    def __init__(
        self,
        store: Store | str | Path,
        run: str,
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        state: Callable[[], Any] | None = None,
        policy: str | Mapping[str, Any] | SavePolicy = "last",
        keep: str | RetentionPolicy | Sequence[Any] | None = None,
        keep_weights: str | RetentionPolicy | Sequence[Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        record_path: bool = True,
        capture: bool = True,
        async_save: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store if isinstance(store, Store) else open_store(store, create=True)
        self.run = run
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        if state is None and model is None:
            raise InvalidPolicyError("the recorder needs a model or a state() function to save")
        self.state_fn = state
        self.policy = parse_save_policy(policy)
        self.keep = parse_retention(keep) if keep is not None else []
        self.keep_weights = parse_retention(keep_weights) if keep_weights is not None else None
        if self.keep_weights is not None and not self.keep:
            raise InvalidPolicyError("keep_weights needs keep (the checkpoints that stay whole)",
                                     hint='e.g. keep="last:2", keep_weights="all"')  # fmt: skip
        self.static_metadata = dict(metadata or {})
        self.capture = capture
        self.async_save = async_save
        self._pending: SaveHandle | None = None
        self._committed: set[int] = set()  # steps whose (async) commit is done
        self._clock = clock
        self._t0 = clock()
        weight_policies = [p for p in self.policy.walk() if isinstance(p, WeightChange)]
        self.tracker: WeightTracker | None = None
        if weight_policies:
            if model is None:
                raise InvalidPolicyError("a weight_change policy needs the model (Recorder(model=...))")
            modules = sorted({m for p in weight_policies for m in (p.modules or ())}) or None
            sample = 0 if any(p.sample == 0 for p in weight_policies) else max(p.sample for p in weight_policies)
            self.tracker = WeightTracker(model, sample=sample, modules=modules)
            self.tracker.reset()
        self.paths = thin.PathTracker(self.store, run) if record_path else None
        self.history: list[Entry] = thin.history(self.store, run) if run in self.store.runs() else []
        self._prev_step: int | None = None
        self._prev_epoch: float | None = None
        self.last_decision: Decision | None = None
        self.last_retention: RetentionPlan | None = None
        self.saved: list[CheckpointInfo] = []

    # ------------------------------------------------------------------------------------------------ calls
    def elapsed(self) -> float:
        return self._clock() - self._t0

    def step(
        self,
        step: int,
        *,
        epoch: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        is_last: bool = False,
        force: bool = False,
        reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Ask the policy about ``step``; save if it says so (or if ``force``). Returns the decision."""
        step = int(step)
        ms = plain_metrics(metrics)
        if self.history and step <= self.history[-1].step:
            if step == self.history[-1].step:  # what was due at this step was saved with it
                self._prev_step = step
                if epoch is not None:
                    self._prev_epoch = max(epoch, self._prev_epoch if self._prev_epoch is not None else epoch)
            if step == self.history[-1].step and ms:
                self._add_metrics(step, ms)
                return self._done(Decision.no(f"step {step} is already saved; its metrics were updated"))
            return self._done(Decision.no(f"step {step} is not after the last saved step {self.history[-1].step}"))
        wc = self.tracker.distances() if self.tracker is not None and not force else None
        now = Now(step, epoch, ms, self.elapsed(), self._prev_step, self._prev_epoch, is_last, wc)
        decision = Decision.yes(reason or "saved on request") if force else self.policy.decide(now, self.history)
        self._prev_step, self._prev_epoch = step, epoch
        if decision:
            self._save(now, decision, metadata)
        return self._done(decision)

    def save(self, step: int, *, reason: str = "saved on request", **kwargs: Any) -> Decision:
        """Save ``step`` now, whatever the policy says, and wait for its commit (a save asked for by hand, before a
        risky change, should be on disk when this returns)."""
        decision = self.step(step, force=True, reason=reason, **kwargs)
        self.wait()
        return decision

    def finish(self, step: int, **kwargs: Any) -> Decision:
        """The last call of a run: ``step(..., is_last=True)``, then :meth:`wait`."""
        decision = self.step(step, is_last=True, **kwargs)
        self.wait()
        return decision

    def wait(self) -> CheckpointInfo | None:
        """Wait for the save in flight (and its retention); raise its failure. Returns its info, if one was."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception:
            if pending.step not in self._committed:  # not saved: the policy's history must not count it
                self.history = [e for e in self.history if e.step != pending.step]
            raise

    def _done(self, d: Decision) -> Decision:
        self.last_decision = d
        return d

    # ---------------------------------------------------------------------------------------------- saving
    def _state(self) -> Any:
        if self.state_fn is not None:
            return self.state_fn()
        return training_state(self.model, self.optimizer, self.scheduler, self.scaler)

    def _save(self, now: Now, decision: Decision, extra: Mapping[str, Any] | None) -> None:
        self.wait()  # the path tracker measures from the last commit; a failed save is raised here
        state = self._state()
        meta: dict[str, Any] = dict(self.static_metadata)
        reason = decision.reason.encode()[:4000].decode(errors="ignore")  # the schema allows 4096 bytes
        meta.update({"step": now.step, "save_reason": reason, "save_policy": self.policy.to_json()})
        meta["elapsed"] = round(float(now.time or 0.0), 3)
        if now.epoch is not None:
            meta["epoch"] = int(now.epoch) if float(now.epoch).is_integer() else float(now.epoch)
        if now.weight_change:
            meta["weight_change"] = {k: round(v, 6) for k, v in now.weight_change.items() if math.isfinite(v)}
        meta.update(extra or {})
        if self.capture:
            meta = md_schema.capture(now.step, self.optimizer, self.scheduler, self.scaler, metadata=meta,
                                     metrics=now.metrics or None, git=False)  # fmt: skip
        elif now.metrics:
            meta["metrics"] = {**meta.get("metrics", {}), **now.metrics}
        record = weights = None
        if self.paths is not None:
            _skeleton, leaves = tree.flatten(state)
            record, weights = self.paths.measure(now.step, leaves)
            meta[PATH_KEY] = record
            del leaves
        # The policy's history gets the save now; its stored size once committed.
        index = len(self.history)
        self.history.append(
            Entry(now.step, now.epoch, dict(now.metrics), stored_bytes=0,
                  path=None if record is None else float(record["path_length"]), time=now.time, reason=decision.reason)
        )  # fmt: skip

        def committed(info: CheckpointInfo) -> None:  # on the store's worker thread for an async save
            self._committed.add(info.step)
            if self.paths is not None and record is not None and weights is not None:
                self.paths.commit(now.step, record, weights)
            self.saved.append(info)
            self.history[index] = dataclasses.replace(self.history[index], stored_bytes=info.stored_bytes)
            if self.keep:
                self.retain()

        if self.async_save:
            self._pending = self.store.save_async(self.run, now.step, state, meta, on_commit=committed)
        else:
            committed(self.store.save(self.run, now.step, state, meta))
        if self.tracker is not None:
            self.tracker.reset()

    def _add_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        def put(md: dict[str, Any]) -> None:
            md["metrics"] = {**(md.get("metrics") or {}), **metrics}

        self.store.update_metadata(f"{self.run}@{step}", put)
        last = self.history[-1]
        self.history[-1] = Entry(last.step, last.epoch, {**last.metrics, **metrics}, last.tags, last.pinned,
                                 last.stored_bytes, last.path, last.time, last.reason)  # fmt: skip

    def retain(self) -> dict[str, Any]:
        """Apply the ``keep`` policies to the run now (what :meth:`step` does after each save)."""
        if not self.keep:
            return {"deleted": []}
        the_plan, recs = thin.plan_thin(self.store, self.run, self.keep, keep_weights=self.keep_weights)
        self.last_retention = the_plan
        if not the_plan.drop and not the_plan.weights_only:
            return {"deleted": []}
        return thin.apply_plan(self.store, self.run, the_plan, recs)

    def pin(self, step: int, pinned: bool = True) -> None:
        """Pin a saved step: no retention policy will remove it."""
        thin.pin(self.store, f"{self.run}@{step}", pinned)


#: Another name for :class:`Recorder`, for those who look for a "checkpointer".
Checkpointer = Recorder
