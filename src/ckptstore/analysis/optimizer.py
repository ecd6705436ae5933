"""What the optimizer state says: relative update size per layer, Adam's effective step and second moment.

For every weight tensor θ of a store run and every checkpoint t (docs/analysis-averages.md, "Optimizer"):

* ``rel_update[t]`` = ‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖ (``None`` at t = 0), in float64;
* from Adam/AdamW's ``exp_avg_sq`` v and ``step`` s of the same checkpoint, the bias-corrected v̂ = v / (1 − β₂^s)
  and the per-element effective step lr / (√v̂ + ε), with lr, β₂ and ε of the tensor's param group as stored:
  its ``mean``, ``median``, ``min`` and ``max``;
* ``v_near_zero[t]``: the fraction of elements with √v̂ ≤ ε (the ε term dominates: no gradient reaches them);
* ``v_exploding[t]``: the fraction with √v̂ > ``explode`` × the median √v̂ of the tensor's entries above ε, or
  not finite;
* spikes: checkpoints where a tensor's relative update exceeds ``spike`` × the median of its other updates.

The optimizer's parameter ids are matched to weight names by the param groups' order: first the weights in
state-dict order, then open_clip_train's grouping (gains, biases and ``logit_scale`` first, then the rest); the
first order in which every ``exp_avg_sq`` has its weight's shape is used, and the result says which.

Each tensor is one independent job (:func:`tensor_optimizer`), reading only that tensor and its optimizer state
through the run (a few copies of one tensor in memory); :mod:`ckptstore.analysis.distributed` runs the same jobs on
Dask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptstore.analysis.trajectory import StoreTrajectory, Trajectory, TrajectoryError, leaf_values
from ckptstore.format import tree
from ckptstore.format.manifest import Manifest


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


@dataclass(frozen=True)
class OptimizerThresholds:
    explode: float = 1e3  # √v̂ above this multiple of the tensor's median √v̂ counts as exploding
    spike: float = 5.0  # a relative update above this multiple of the tensor's median update is a spike

    def to_dict(self) -> dict[str, float]:
        return {"explode": self.explode, "spike": self.spike}


@dataclass(frozen=True)
class Slot:
    """Where one weight's optimizer state is: its parameter id and param group, and the group's settings."""

    param: int
    group: int


@dataclass
class OptimizerReport:
    points: list[dict[str, Any]]
    mapping: str
    tensors: dict[str, dict[str, Any]]
    model: dict[str, Any]
    spikes: list[dict[str, Any]]
    thresholds: OptimizerThresholds = field(default_factory=OptimizerThresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "mapping": self.mapping,
            "thresholds": self.thresholds.to_dict(),
            "model": self.model,
            "tensors": self.tensors,
            "spikes": self.spikes,
        }


# ------------------------------------------------------------------------------------------- optimizer layout
def _optimizer_node(skeleton: Any) -> Mapping[str, Any] | None:
    if not isinstance(skeleton, Mapping):
        return None
    for key in ("optimizer", "optimizer_state", "optim"):
        node = skeleton.get(key)
        if isinstance(node, Mapping) and "param_groups" in node and "state" in node:
            return node
    return None


def _plain(skeleton: Any) -> Any:
    """A skeleton as plain Python values, tensors replaced by their stored names."""
    return tree.unflatten(skeleton, lambda name: name)


def optimizer_layout(traj: StoreTrajectory, index: int = 0) -> tuple[dict[str, Slot], list[dict[str, Any]], str]:
    """``({weight name: Slot}, param groups, how they were matched)`` of checkpoint ``index``."""
    m = traj.manifest(index)
    node = _optimizer_node(m.data.get("tree"))
    if node is None:
        raise TrajectoryError(
            f"{m.ref} holds no optimizer state (an 'optimizer' with 'state' and 'param_groups')",
            hint="the optimizer analysis needs checkpoints saved with their optimizer (open_clip_train does)",
        )
    opt = _plain(node)
    groups = list(opt["param_groups"])
    state = opt["state"]
    order = [(int(p), g) for g, grp in enumerate(groups) for p in grp["params"]]
    weights = traj.weights
    shapes = {w.name: w.shape for w in weights}

    def v_shape(pid: int) -> tuple[int, ...] | None:
        st = state.get(pid) if isinstance(state, Mapping) else None
        name = st.get("exp_avg_sq") if isinstance(st, Mapping) else None
        return tuple(m.full_tensors[name]["shape"]) if isinstance(name, str) else None

    def exclude(name: str, shape: tuple[int, ...]) -> bool:  # open_clip_train/main.py's weight-decay split
        return len(shape) < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    names = [w.name for w in weights]
    candidates = {
        "state-dict order": names,
        "open_clip_train groups": [n for n in names if exclude(n, shapes[n])]
        + [n for n in names if not exclude(n, shapes[n])],
    }
    for how, cand in candidates.items():
        if len(cand) != len(order):
            continue
        if all(v_shape(pid) in (None, shapes[n]) for n, (pid, _) in zip(cand, order, strict=True)):
            slots = {n: Slot(pid, g) for n, (pid, g) in zip(cand, order, strict=True) if v_shape(pid) is not None}
            return slots, groups, how
    raise TrajectoryError(
        f"{m.ref}: cannot match the optimizer's {len(order)} parameters to the {len(names)} weight tensors",
        hint="the optimizer analysis knows the state-dict order and open_clip_train's param groups",
    )


# ------------------------------------------------------------------------------------------- reading
def iter_state_tensor(traj: StoreTrajectory, index_name: Callable[[int], str | None]) -> Any:
    """Per checkpoint, the tensor named ``index_name(i)`` (a stored tensor name) as float values, or ``None``;
    walks in order so each delta decodes against the object read just before."""
    known: dict[str, np.ndarray] = {}
    for i in range(len(traj)):
        name = index_name(i)
        rec = None if name is None else traj.tensor_record(i, name)
        if name is None or rec is None:
            yield None
            continue
        leaf = traj.read(i, [name], known=known)[name]
        known.clear()
        known[rec["object"]] = leaf.data
        yield leaf_values(leaf) if leaf.dtype in ("float16", "bfloat16", "float32", "float64") else leaf.to_numpy()


_STATE_READ = ("step", "exp_avg_sq")  # what tensor_optimizer reads of a parameter's state


def _optimizer_of(m: Manifest) -> tuple[dict[str, Any] | None, list[str]]:
    """One checkpoint's optimizer state as :func:`tensor_optimizer` reads it: its param groups (without their
    parameter lists) and, per parameter id, the stored names of ``step`` and ``exp_avg_sq`` (None where the
    checkpoint lacks the tensor); and those names, for the trajectory's index."""
    node = _optimizer_node(m.data.get("tree"))
    if node is None:
        return None, []
    opt = _plain(node)
    groups = opt["param_groups"]
    if isinstance(groups, list | tuple):
        groups = [{k: v for k, v in g.items() if k != "params"} if isinstance(g, Mapping) else g for g in groups]
    state: dict[Any, dict[str, Any]] = {}
    names: list[str] = []
    full = m.full_tensors
    if isinstance(opt.get("state"), Mapping):
        for pid, st in opt["state"].items():
            if not isinstance(st, Mapping):
                continue
            kept = {k: st[k] for k in _STATE_READ if k in st}
            for k, v in kept.items():
                if isinstance(v, str):
                    if v in full:
                        names.append(v)
                    else:
                        kept[k] = None  # no such tensor: read as missing, like a name the state lacks
            state[pid] = kept
    return {"state": state, "param_groups": groups}, names


def optimizer_states(traj: StoreTrajectory) -> list[dict[str, Any] | None]:
    """Per checkpoint, what the per-tensor jobs read of its optimizer state (:func:`_optimizer_of`), or ``None``:
    gathered once per trajectory, the tensors it names added to the trajectory's index."""
    return traj.gather("optimizer", _optimizer_of)


def _state_name(opt: Mapping[str, Any] | None, pid: int, key: str) -> str | None:
    st = opt["state"].get(pid) if opt is not None and isinstance(opt.get("state"), Mapping) else None
    value = st.get(key) if isinstance(st, Mapping) else None
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------- one tensor
def tensor_optimizer(
    traj: StoreTrajectory, name: str, slot: Slot | None, thresholds: OptimizerThresholds | None = None
) -> dict[str, Any]:
    """The optimizer answers for one weight tensor through the run (the unit of work, local or on Dask)."""
    th = thresholds or OptimizerThresholds()
    n = len(traj)
    norm2 = np.zeros(n)
    diff2 = np.zeros(n)
    prev: np.ndarray | None = None
    for t, x in enumerate(traj.iter_tensor(name)):
        x64 = x.astype(np.float64).reshape(-1)
        norm2[t] = float(x64 @ x64)
        if prev is not None:
            d = x64 - prev
            diff2[t] = float(d @ d)
        prev = x64
    del prev
    rel: list[float | None] = [None]
    rel += [_num(np.sqrt(diff2[t]) / np.sqrt(norm2[t - 1])) if norm2[t - 1] > 0 else None for t in range(1, n)]
    out: dict[str, Any] = {
        "numel": next(w.numel for w in traj.weights if w.name == name),
        "norm2": norm2.tolist(),
        "diff2": diff2.tolist(),
        "rel_update": rel,
    }
    if slot is None:
        return out
    out["param"], out["group"] = slot.param, slot.group
    opts = optimizer_states(traj)
    steps = [
        None if s is None else float(np.asarray(s).reshape(-1)[0])
        for s in iter_state_tensor(traj, lambda i: _state_name(opts[i], slot.param, "step"))
    ]
    stats: dict[str, list[float | None]] = {k: [] for k in ("mean", "median", "min", "max")}
    near: list[float | None] = []
    expl: list[float | None] = []
    lrs: list[float | None] = []
    vs = iter_state_tensor(traj, lambda i: _state_name(opts[i], slot.param, "exp_avg_sq"))
    for t, v in enumerate(vs):
        opt = opts[t]
        grp = opt["param_groups"][slot.group] if opt is not None else {}
        lr, eps = grp.get("lr"), grp.get("eps")
        betas = grp.get("betas")
        s = steps[t]
        if v is None or s is None or s <= 0 or not isinstance(lr, int | float) or not isinstance(betas, tuple | list):
            for lst in (*stats.values(), near, expl, lrs):
                lst.append(None)
            continue
        lrs.append(float(lr))
        root = np.sqrt(v.astype(np.float64).reshape(-1) / (1.0 - float(betas[1]) ** s))
        step_size = float(lr) / (root + float(eps or 0.0))
        stats["mean"].append(_num(step_size.mean()))
        stats["median"].append(_num(np.median(step_size)))
        stats["min"].append(_num(step_size.min()))
        stats["max"].append(_num(step_size.max()))
        near.append(float(np.count_nonzero(root <= float(eps or 0.0))) / root.size)
        finite = np.isfinite(root)
        active = root[finite & (root > float(eps or 0.0))]  # the median of the units that get gradient at all
        med = float(np.median(active)) if active.size else math.inf
        expl.append(float(np.count_nonzero(~finite | (root > th.explode * med))) / root.size)
    out.update(step=steps, lr=lrs, eff_step=stats, v_near_zero=near, v_exploding=expl)
    return out


def spikes_of(name: str, rel: Sequence[float | None], labels: Sequence[str], factor: float) -> list[dict[str, Any]]:
    vals = [(t, v) for t, v in enumerate(rel) if v is not None]
    if len(vals) < 3:
        return []
    out = []
    for t, v in vals:
        others = [u for s, u in vals if s != t]
        med = float(np.median(others))
        if med > 0 and v > factor * med:
            out.append({"tensor": name, "index": t, "label": labels[t], "rel_update": v, "median": med})
    return out


def combine(
    traj: Trajectory, mapping: str, per_tensor: Mapping[str, dict[str, Any]], thresholds: OptimizerThresholds
) -> OptimizerReport:
    """The run's report from the per-tensor jobs (in the trajectory's tensor order, whoever computed them)."""
    n = len(traj)
    norm2 = np.zeros(n)
    diff2 = np.zeros(n)
    tensors: dict[str, dict[str, Any]] = {}
    spikes: list[dict[str, Any]] = []
    labels = [p.label for p in traj.points]
    for name in traj.weight_names():
        r = dict(per_tensor[name])
        norm2 += np.asarray(r.pop("norm2"))
        diff2 += np.asarray(r.pop("diff2"))
        tensors[name] = r
        spikes += spikes_of(name, r["rel_update"], labels, thresholds.spike)
    model_rel: list[float | None] = [None]
    model_rel += [_num(np.sqrt(diff2[t] / norm2[t - 1])) if norm2[t - 1] > 0 else None for t in range(1, n)]
    spikes.sort(key=lambda s: (s["index"], -s["rel_update"]))
    return OptimizerReport(
        [p.as_dict() for p in traj.points], mapping, tensors, {"rel_update": model_rel}, spikes, thresholds
    )


def analyze_optimizer(
    traj: Trajectory,
    *,
    thresholds: OptimizerThresholds | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> OptimizerReport:
    """Relative updates, Adam effective steps and second-moment health of every weight tensor of a store run."""
    if not isinstance(traj, StoreTrajectory):
        raise TrajectoryError(
            "the optimizer analysis reads a store run", hint="store the .pt files first: `ckpt ingest FOLDER`"
        )
    th = thresholds or OptimizerThresholds()
    slots, _, how = optimizer_layout(traj)
    names = traj.weight_names()
    results = {}
    for done, name in enumerate(names, 1):
        results[name] = tensor_optimizer(traj, name, slots.get(name), th)
        if progress is not None:
            progress(done, len(names))
    return combine(traj, how, results, th)
