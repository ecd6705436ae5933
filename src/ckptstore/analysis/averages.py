"""Weight averages of stored checkpoints: LAWA (the last K), a soup of chosen ones, an EMA over a run.

:func:`average_checkpoints` reads the chosen checkpoints of one store run tensor by tensor (one weight tensor
through every chosen checkpoint before the next, as :class:`~ckptstore.analysis.trajectory.StoreTrajectory` walks),
accumulates in float64 and casts each result back to the tensor's dtype, then stores the average as a new checkpoint
of a new run (``<run>-lawa<K>``, ``<run>-soup<N>``, ``<run>-ema<DECAY>`` by default) at the step of the last
checkpoint averaged. The recipe (which checkpoints, what weights, the EMA decay) goes into its metadata under
``average``. A run of averages never shares a name with a run of real checkpoints unless asked, and the store
refuses to overwrite an existing checkpoint (docs/analysis-averages.md).

Only the model weights are averaged (the node ``state_dict`` / ``model`` ... of the checkpoint); optimizer state and
other counters are not carried over: an average is a model, not a resumable training state. Non-floating tensors of
the weights (BatchNorm's ``num_batches_tracked``, integer buffers) are taken from the last checkpoint averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.analysis.trajectory import WEIGHT_KEYS, StoreTrajectory, TrajectoryError
from ckptstore.format import tree

if TYPE_CHECKING:
    from ckptstore.store import CheckpointInfo, Store


@dataclass(frozen=True)
class AverageRecipe:
    """Which checkpoints, with which weights: ``kind`` is ``"uniform"`` (LAWA, soups) or ``"ema"``."""

    refs: tuple[str, ...]
    weights: tuple[float, ...]
    kind: str
    decay: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "refs": list(self.refs), "weights": list(self.weights), "decay": self.decay}


def ema_weights(n: int, decay: float) -> tuple[float, ...]:
    """The weight of each of ``n`` checkpoints in ``e_0 = x_0, e_t = decay * e_{t-1} + (1 - decay) * x_t``."""
    if not 0.0 <= decay < 1.0:
        raise TrajectoryError(f"EMA decay must be in [0, 1), got {decay}")
    return tuple([decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - 1 - i) for i in range(1, n)])


def recipe(
    store: Store, run: str, *, last: int | None = None, refs: Sequence[str] | None = None, ema: float | None = None
) -> AverageRecipe:
    """The checkpoints of ``run`` to average: the last ``last`` ones, or ``refs``; uniform, or an EMA with ``ema``."""
    if (last is None) == (refs is None):
        raise TrajectoryError("give either the last K checkpoints or a list of references to average")
    if last is not None:
        steps = store.steps(run)
        if not steps:
            raise TrajectoryError(f"run {run!r} has no checkpoints", hint="`ckpt ls` lists the runs")
        if last < 1:
            raise TrajectoryError(f"--last wants K >= 1, got {last}")
        chosen = [store.manifest(run, s).ref for s in steps[-last:]]
    else:
        assert refs is not None
        chosen = [store.resolve(r if "@" in r else f"{run}@{r}").ref for r in refs]
        if not chosen:
            raise TrajectoryError("no checkpoints to average")
        chosen = sorted(dict.fromkeys(chosen), key=lambda r: int(r.rsplit("@", 1)[1]))
    n = len(chosen)
    if ema is not None:
        return AverageRecipe(tuple(chosen), ema_weights(n, ema), "ema", ema)
    return AverageRecipe(tuple(chosen), tuple([1.0 / n] * n), "uniform")


def default_run_name(run: str, r: AverageRecipe, last: int | None) -> str:
    if r.kind == "ema":
        return f"{run}-ema{r.decay:g}"
    return f"{run}-lawa{last}" if last is not None else f"{run}-soup{len(r.refs)}"


def cast_back(acc: np.ndarray, dtype: str, framework: str = "numpy") -> tree.Leaf:
    """A float64 array as a leaf of ``dtype``: round to nearest (bfloat16: from float32, round half to even)."""
    if dtype == "bfloat16":
        w = acc.astype(np.float32).reshape(-1).view(np.uint32)
        bias = ((w >> 16) & 1) + np.uint32(0x7FFF)
        nan = (w & 0x7FFFFFFF) > 0x7F800000
        out = np.where(nan, (w >> 16) | 0x40, (w + bias) >> 16).astype(np.uint16)
        return tree.Leaf("bfloat16", tuple(acc.shape), out, framework)
    out_arr = acc.astype(np.dtype(dtype))
    return tree.Leaf(dtype, tuple(acc.shape), np.ascontiguousarray(out_arr).reshape(-1), framework)


def average_leaves(
    traj: StoreTrajectory, weights: Sequence[float], *, progress: Callable[[int, int], None] | None = None
) -> tuple[str, dict[str, Any]]:
    """The weighted average of the trajectory's model weights: (the weights key, ``{stored name: Leaf}``).

    Each floating tensor is read through the checkpoints in order and summed as ``Σ w_i x_i`` in float64 (for a
    uniform average, ``Σ x_i`` then one division by K, so K identical checkpoints give the checkpoint back bit for
    bit); the result is cast back to the tensor's dtype."""
    if len(weights) != len(traj):
        raise TrajectoryError(f"{len(weights)} weights for {len(traj)} checkpoints")
    last_index = len(traj) - 1
    last = traj.manifest(last_index)
    root = last.data.get("tree")
    key = next((k for k in WEIGHT_KEYS if isinstance(root, Mapping) and isinstance(root.get(k), Mapping)), "")
    node: Any = root[key] if key and isinstance(root, Mapping) else root
    if not isinstance(node, Mapping):
        raise TrajectoryError(f"{last.ref} holds no model weights")
    uniform = len(set(weights)) == 1
    framework = str(last.data.get("framework", "numpy"))  # a load hands back the kind of tensor the run has
    out: dict[str, Any] = {}
    floats = {w.name: w for w in traj.weights}
    params = [p for p, sub in node.items() if isinstance(sub, dict) and set(sub) == {"$tensor"}]
    for done, param in enumerate(params, 1):
        name = str(param).removeprefix("module.")
        if name in floats:
            acc = np.zeros(floats[name].shape, dtype=np.float64)
            for w, x in zip(weights, traj.iter_tensor(name), strict=True):
                if uniform:
                    acc += x
                else:
                    acc += w * x.astype(np.float64)
            if uniform:
                acc /= len(weights)
            out[param] = cast_back(acc, floats[name].dtype, framework)
        else:  # integer / bool buffers: the last checkpoint's value
            tname = node[param]["$tensor"]
            out[param] = traj.read(last_index, [tname])[tname]
        if progress is not None:
            progress(done, len(params))
    return key, out


def average_checkpoints(
    store: Store,
    run: str,
    *,
    last: int | None = None,
    refs: Sequence[str] | None = None,
    ema: float | None = None,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckpointInfo:
    """Average checkpoints of ``run`` (``last`` K, or ``refs``; uniform, or EMA ``ema``) and store the average as
    ``name@<last step averaged>`` (default name: ``<run>-lawa<K>`` / ``<run>-soup<N>`` / ``<run>-ema<DECAY>``)."""
    r = recipe(store, run, last=last, refs=refs, ema=ema)
    target = name or default_run_name(run, r, last)
    if target == run:
        raise TrajectoryError(f"the average would go into run {run!r} itself", hint="name another run for it (--name)")
    traj = StoreTrajectory(store, run, list(r.refs))
    key, leaves = average_leaves(traj, r.weights, progress=progress)
    src = traj.manifest(len(traj) - 1)
    state: dict[str, Any] = {key: leaves} if key else dict(leaves)
    meta: dict[str, Any] = {"average": {**r.to_dict(), "run": run, "accumulate": "float64"}}
    for k in ("epoch", "model", "model_config", "hparams", "name"):
        if k in src.metadata:
            meta[k] = src.metadata[k]
    step = int(src.metadata["step"]) if isinstance(src.metadata.get("step"), int) else src.step
    meta["step"] = step
    return store.save(target, src.step, state, metadata=meta)


# ------------------------------------------------------------------------------------------- evaluation
def _torch_state(key: str, leaves: Mapping[str, tree.Leaf]) -> dict[str, Any]:
    from ckptstore.torch import leaf_to_tensor

    return {str(k).removeprefix("module."): leaf_to_tensor(lf) for k, lf in leaves.items()}


def analyze_averages(
    store: Store,
    run: str,
    *,
    ks: Sequence[int] = (2, 5),
    ema: float | None = 0.9,
    evaluate: Callable[[Mapping[str, Any]], Mapping[str, float]] | None = None,
    probe: Any = None,
    model_config: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The last checkpoint against LAWA of the last k (each of ``ks``) and an EMA over the whole run, evaluated
    on a probe (default: zero-shot loss and accuracy of an OpenCLIP run on 200 digits); nothing is stored.

    Returns ``{"run", "candidates": [{"name", "kind", "refs", "decay", metrics...}], "best": {metric: name}}``."""
    steps = store.steps(run)
    if not steps:
        raise TrajectoryError(f"run {run!r} has no checkpoints", hint="`ckpt ls` lists the runs")
    full = StoreTrajectory(store, run)
    if evaluate is None:
        from ckptstore.analysis.interpolation import OpenClipEvaluator
        from ckptstore.analysis.probes import digits_probe

        evaluate = OpenClipEvaluator(full, probe or digits_probe(200), model_config=model_config)
    plans: list[tuple[str, AverageRecipe]] = [("last", recipe(store, run, last=1))]
    for k in ks:
        if 1 < k <= len(steps):
            plans.append((f"lawa{k}", recipe(store, run, last=k)))
    if ema is not None and len(steps) > 1:
        plans.append((f"ema{ema:g}", recipe(store, run, last=len(steps), ema=ema)))
    out = []
    for done, (name, r) in enumerate(plans, 1):
        traj = StoreTrajectory(store, run, list(r.refs))
        key, leaves = average_leaves(traj, r.weights)
        metrics = dict(evaluate(_torch_state(key, leaves)))
        del leaves
        out.append({"name": name, **r.to_dict(), **{k: float(v) for k, v in metrics.items()}})
        if progress is not None:
            progress(done, len(plans))
    best = {}
    for metric in out[0]:
        if metric in ("loss", "top1", "top5"):
            pick = min if metric == "loss" else max
            best[metric] = pick(out, key=lambda c: c[metric])["name"]
    return {"run": run, "candidates": out, "best": best}
