"""The per-tensor analyses as independent Dask tasks, each reading straight from the store URL.

``ckpt analyze optimizer|plasticity --dask ADDRESS`` (or :func:`analyze_on_dask`) opens the run once on the client
to plan (which tensors, the optimizer's parameter layout), then submits one ``dask.distributed`` task per weight
tensor. A task opens the store from its URL (``s3://...`` with the given storage options, or a path every worker
sees), reads that one tensor (and its optimizer state) through the chosen checkpoints, and returns the same
per-tensor record the local path computes (:func:`ckptstore.analysis.optimizer.tensor_optimizer`,
:func:`ckptstore.analysis.plasticity.tensor_plasticity`); the client combines them exactly as the local path does,
so the JSON is the same. Dask schedules; ckptstore only describes the tasks (docs/analysis-averages.md, "Dask").

Dormant units need whole models and stay on the client (``plasticity`` on Dask computes the weight answers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ckptstore.analysis.trajectory import StoreTrajectory, TrajectoryError
from ckptstore.errors import MissingDependencyError

KINDS = ("optimizer", "plasticity")

_local = threading.local()  # per worker thread: the last (store, trajectory) opened, reused by its next tasks


def _trajectory(url: str, storage_options: Mapping[str, Any] | None, run: str, refs: Sequence[str]) -> StoreTrajectory:
    from ckptstore.store import open_store

    key = (url, repr(sorted((storage_options or {}).items())), run, tuple(refs))
    cached = getattr(_local, "traj", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    store = open_store(url, storage_options=dict(storage_options or {}))
    traj = StoreTrajectory(store, run, list(refs))
    _local.traj = (key, traj)
    return traj


def tensor_task(
    url: str,
    storage_options: Mapping[str, Any] | None,
    run: str,
    refs: Sequence[str],
    kind: str,
    name: str,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """One task: the ``kind`` record of tensor ``name`` (what a worker runs)."""
    traj = _trajectory(url, storage_options, run, refs)
    if kind == "optimizer":
        from ckptstore.analysis.optimizer import tensor_optimizer

        return tensor_optimizer(traj, name, options.get("slot"), options.get("thresholds"))
    if kind == "plasticity":
        from ckptstore.analysis.plasticity import tensor_plasticity

        return tensor_plasticity(traj, name, bool(options.get("spectral", True)))
    raise TrajectoryError(f"no per-tensor analysis {kind!r}", hint=f"one of {', '.join(KINDS)}")


def _client(address: Any) -> Any:
    try:
        from distributed import Client
    except ImportError:
        raise MissingDependencyError(
            "the Dask path needs dask.distributed", hint="pip install 'ckptstore[dask]'"
        ) from None
    if isinstance(address, Client):
        return address, False
    return Client(address), True


def analyze_on_dask(
    kind: str,
    url: str,
    run: str,
    *,
    address: Any = None,
    refs: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    spectral: bool = True,
    thresholds: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """The ``kind`` analysis (``optimizer`` or ``plasticity``) of ``run`` in the store at ``url``, one Dask task per
    tensor, on the cluster at ``address`` (a scheduler address or a ``distributed.Client``). Returns the same
    report object as the local analysis (plasticity: its weight answers, no dormant units)."""
    from ckptstore.store import open_store

    if kind not in KINDS:
        raise TrajectoryError(f"no per-tensor analysis {kind!r}", hint=f"one of {', '.join(KINDS)}")
    store = open_store(url, storage_options=dict(storage_options or {}))
    traj = StoreTrajectory(store, run, refs)
    chosen = [p.label for p in traj.points]
    names = traj.weight_names()
    per_name: dict[str, dict[str, Any]] = {n: {} for n in names}
    how = ""
    if kind == "optimizer":
        from ckptstore.analysis.optimizer import OptimizerThresholds, optimizer_layout

        thresholds = thresholds or OptimizerThresholds()
        slots, _, how = optimizer_layout(traj)
        per_name = {n: {"slot": slots.get(n), "thresholds": thresholds} for n in names}
    else:
        per_name = {n: {"spectral": spectral} for n in names}
    client, owned = _client(address)
    try:
        from distributed import as_completed

        futures = {
            client.submit(tensor_task, url, storage_options, run, chosen, kind, n, per_name[n], pure=False): n
            for n in names
        }
        results: dict[str, dict[str, Any]] = {}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if progress is not None:
                progress(done, len(names))
    finally:
        if owned:
            client.close()
    if kind == "optimizer":
        from ckptstore.analysis.optimizer import combine

        return combine(traj, how, results, thresholds)
    from ckptstore.analysis.plasticity import combine as combine_plasticity

    return combine_plasticity(traj, results)
