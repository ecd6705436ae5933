"""Which checkpoint transfers best: a linear probe on each checkpoint's frozen image features.

:func:`analyze_transfer` splits a labelled :class:`~ckptstore.analysis.probes.ProbeSet` once (stratified, seeded:
every checkpoint sees the same train and test images), extracts each checkpoint's image features, fits a
scikit-learn ``LogisticRegression`` on the training part (features standardised with the training statistics) and
reports train and test accuracy per checkpoint and the best checkpoint.

Features (``features=``):

* ``"embedding"`` (default): the final image embedding, L2-normalised — the space zero-shot classification and
  retrieval use, and defined for every open_clip model;
* ``"pre-projection"``: the pooled vision-tower output before the image projection (wider; for ViT towers, where
  CLIP's own linear-probe evaluations read features).

For any other ``nn.Module``, pass ``factory`` (builds the architecture; each checkpoint's weights are loaded into it)
and optionally ``transform`` (an RGB PIL image to an input tensor; default: pixels scaled to [0, 1], ``C x H x W``)
and ``feature_fn(model, batch) -> features`` (default: ``model(batch)``, flattened per image).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ckptstore.analysis.representations import DEFAULT_BATCH_SIZE, OpenClipRunner, need_torch
from ckptstore.analysis.trajectory import Point, Trajectory
from ckptstore.errors import CkptStoreError, MissingDependencyError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptstore.analysis.probes import ProbeSet

__all__ = ["TransferError", "TransferResult", "analyze_transfer", "plot_transfer"]

Features = Literal["embedding", "pre-projection"]


class TransferError(CkptStoreError, ValueError):
    """A transfer analysis cannot run as asked (no labels, a split that leaves a class out, bad parameters)."""


@dataclass
class TransferResult:
    """Linear-probe accuracy per checkpoint. ``to_dict()`` is the JSON record (docs/analysis-representations.md)."""

    points: list[Point]
    dataset: dict[str, Any]
    accuracy: list[float]
    train_accuracy: list[float]
    features: str
    C: float
    seed: int
    feature_dim: int
    seconds: list[float] = field(default_factory=list)

    @property
    def best_index(self) -> int:
        """The checkpoint with the highest test accuracy (the earliest among equals)."""
        acc = np.asarray(self.accuracy, dtype=np.float64)
        return int(np.nanargmax(acc)) if np.isfinite(acc).any() else 0

    def to_dict(self) -> dict[str, Any]:
        b = self.best_index
        return {
            "points": [p.as_dict() for p in self.points],
            "dataset": self.dataset,
            "accuracy": [_num(a) for a in self.accuracy],
            "train_accuracy": [_num(a) for a in self.train_accuracy],
            "best": {"index": b, "label": self.points[b].label, "accuracy": _num(self.accuracy[b])},
            "probe": {"features": self.features, "feature_dim": self.feature_dim, "C": self.C, "seed": self.seed},
            "seconds": [round(s, 3) for s in self.seconds],
        }


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test split of ``range(len(labels))``, the same for every checkpoint."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise TransferError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    idx = np.arange(len(labels))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise TransferError(
            f"cannot split {len(labels)} images into train and test with every class on both sides: {exc}",
            hint="use more images per class, or another --test-fraction",
        ) from None
    return np.sort(train), np.sort(test)


def _default_transform(image: Any) -> torch.Tensor:
    import torch

    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _generic_features(
    traj: Trajectory,
    dataset: ProbeSet,
    factory: Callable[[], nn.Module],
    transform: Callable[[Any], Any] | None,
    feature_fn: Callable[[nn.Module, Any], Any] | None,
    batch_size: int,
) -> Callable[[int], np.ndarray]:
    import torch

    tf = transform or _default_transform
    pixels = torch.stack([torch.as_tensor(tf(dataset.image(i))) for i in range(len(dataset))])
    model = factory()
    model.eval()

    def features(index: int) -> np.ndarray:
        try:
            model.load_state_dict(traj.state_dict(index), strict=True)
        except RuntimeError as exc:
            raise TransferError(f"{traj.points[index].label}: the weights do not fit the model: {exc}") from None
        out = []
        with torch.inference_mode():
            for batch in torch.split(pixels, batch_size):
                f = feature_fn(model, batch) if feature_fn is not None else model(batch)
                f = f[0] if isinstance(f, tuple | list) else f
                out.append(torch.as_tensor(f).float().reshape(batch.shape[0], -1).numpy())
        return np.concatenate(out)

    return features


def analyze_transfer(
    traj: Trajectory,
    dataset: ProbeSet,
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
    features: Features = "embedding",
    model_config: Mapping[str, Any] | str | Path | None = None,
    factory: Callable[[], nn.Module] | None = None,
    transform: Callable[[Any], Any] | None = None,
    feature_fn: Callable[[nn.Module, Any], Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> TransferResult:
    """Linear-probe accuracy of every checkpoint's frozen image features on ``dataset`` (which needs labels).

    One stratified split (``test_fraction``, ``seed``) serves every checkpoint. The probe is
    ``StandardScaler`` + ``LogisticRegression(C=C)`` (L2, lbfgs, multinomial). OpenCLIP runs by default;
    ``factory`` (with ``transform`` and ``feature_fn``) for any other model. ``progress(done, total)`` after each
    checkpoint.
    """
    if dataset.labels is None:
        raise TransferError(
            f"the transfer dataset {dataset.name!r} has no labels", hint="give a CSV with a label column"
        )
    if C <= 0:
        raise TransferError(f"C must be positive, got {C}")
    if features not in ("embedding", "pre-projection"):
        raise TransferError(f"features must be 'embedding' or 'pre-projection', got {features!r}")
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise MissingDependencyError(
            "the transfer analysis needs scikit-learn", hint="pip install scikit-learn"
        ) from None
    need_torch(open_clip=factory is None)
    labels = dataset.labels
    train, test = split_indices(labels, test_fraction, seed)
    extract: Callable[[int], np.ndarray]
    if factory is not None:
        extract = _generic_features(traj, dataset, factory, transform, feature_fn, batch_size)
    else:
        runner = OpenClipRunner(traj, model_config=model_config)

        def extract(index: int) -> np.ndarray:
            runner.load(index)
            return runner.encode_images(dataset, batch_size, pre_projection=features == "pre-projection")

    acc: list[float] = []
    train_acc: list[float] = []
    seconds: list[float] = []
    dim = 0
    for i in range(len(traj)):
        start = time.perf_counter()
        x = extract(i).astype(np.float64)
        dim = x.shape[1]
        if not np.isfinite(x).all():  # a diverged checkpoint: no probe can be fitted on its features
            acc.append(math.nan)
            train_acc.append(math.nan)
        else:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
            with warnings.catch_warnings():
                # An early checkpoint's features may not separate; the accuracy reached is still the answer.
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x[train], labels[train])
            acc.append(float(clf.score(x[test], labels[test])))
            train_acc.append(float(clf.score(x[train], labels[train])))
        seconds.append(time.perf_counter() - start)
        if progress is not None:
            progress(i + 1, len(traj))
    return TransferResult(
        points=list(traj.points),
        dataset={
            "name": dataset.name,
            "n_train": len(train),
            "n_test": len(test),
            "classes": list(dataset.class_names),
        },
        accuracy=acc,
        train_accuracy=train_acc,
        features=features if factory is None else "custom",
        C=C,
        seed=seed,
        feature_dim=dim,
        seconds=seconds,
    )


def plot_transfer(result: TransferResult | Mapping[str, Any], path: str | Path) -> Path:
    """A PNG of test (and train) accuracy over the checkpoints, the best one marked. Draws on a private Agg
    figure: the caller's matplotlib backend and rcParams are untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plot_transfer needs matplotlib", hint="pip install matplotlib") from None
    d = result.to_dict() if isinstance(result, TransferResult) else dict(result)
    points = d.get("points") or []
    xs = [p.get("step") if p.get("step") is not None else p.get("index") for p in points]
    acc = [math.nan if a is None else a for a in d.get("accuracy", [])]
    train = [math.nan if a is None else a for a in d.get("train_accuracy", [])]
    fig = Figure(figsize=(6.4, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(xs, acc, marker="o", label="test accuracy")
    if train:
        ax.plot(xs, train, linestyle="--", color="gray", label="train accuracy")
    best = d.get("best") or {}
    if isinstance(best.get("index"), int) and best.get("accuracy") is not None and points:
        ax.scatter([xs[best["index"]]], [best["accuracy"]], s=80, facecolors="none", edgecolors="red", label="best")
    name = (d.get("dataset") or {}).get("name", "")
    ax.set_title(f"linear probe on {name}" if name else "linear probe", loc="left")
    ax.set_xlabel("step" if all(p.get("step") is not None for p in points) else "checkpoint")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
