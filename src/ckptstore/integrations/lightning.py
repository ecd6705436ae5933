"""PyTorch Lightning: a ``Callback`` that saves the trainer's full checkpoint into a store when a save policy says so.

>>> from ckptstore.integrations.lightning import CkptStoreCallback
>>> cb = CkptStoreCallback("runs.ckpt", "mnist", policy="epochs:1, best:val_loss, weights:0.05, last",
...                        keep="last:2,best:val_loss")
>>> trainer = L.Trainer(callbacks=[cb], max_epochs=10)                          # doctest: +SKIP

The state saved is what Lightning's own ``ModelCheckpoint`` would write (``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``loops``, ``epoch``, ``global_step``, hyper-parameters ...), so :func:`export_ckpt` gives a
``.ckpt`` file that ``trainer.fit(model, ckpt_path=...)`` resumes from. The policy is asked after every training
batch (step = ``trainer.global_step``), after validation and at the end of every epoch (``epoch`` counts
completed epochs); metrics are ``trainer.callback_metrics``. Validation metrics that arrive after a step was saved
are added to that checkpoint's metadata.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        from ckptstore.errors import MissingDependencyError

        raise MissingDependencyError(
            "the Lightning integration needs PyTorch Lightning", hint="pip install lightning"
        ) from None

import torch

from ckptstore.integrations._callback import RecorderCallback
from ckptstore.policy.retention import RetentionPolicy
from ckptstore.policy.save import SavePolicy
from ckptstore.store import Store

__all__ = ["CkptStoreCallback", "export_ckpt", "storable"]


def storable(obj: Any, path: str = "", converted: list[str] | None = None) -> Any:
    """A Lightning checkpoint dict with what the store cannot hold made plain: paths and enums become strings,
    namespaces dicts, other objects their ``repr`` (listed in ``converted``). Tensors, numbers, strings, bytes,
    None and containers pass through."""
    if obj is None or isinstance(obj, bool | int | float | str | bytes | torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {k: storable(v, f"{path}/{k}", converted) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [storable(v, f"{path}/{i}", converted) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, enum.Enum):
        return storable(obj.value, path, converted)
    if isinstance(obj, PurePath):
        return str(obj)
    if type(obj).__module__ == "numpy":
        return obj
    if hasattr(obj, "__dict__") and type(obj).__name__ in ("Namespace", "SimpleNamespace"):
        return storable(vars(obj), path, converted)
    if converted is not None:
        converted.append(path or "/")
    return repr(obj)


class CkptStoreCallback(RecorderCallback, pl.Callback):
    """Save Lightning checkpoints into a ckptstore store by policy (see the module docs).

    ``store`` is a :class:`~ckptstore.Store` or a path (created if missing); ``policy`` and ``keep`` take
    the text or object forms of :mod:`ckptstore.policy`; ``metadata`` is added to every checkpoint; with
    ``async_save`` (default) saves return once the state is snapshotted and commit in the background.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        run: str,
        *,
        policy: str | SavePolicy = "epochs:1, last",
        keep: str | RetentionPolicy | Sequence[Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        record_path: bool = True,
        async_save: bool = True,
    ) -> None:
        super().__init__()
        self._set_options(
            store, run, policy=policy, keep=keep, metadata=metadata, record_path=record_path, async_save=async_save
        )
        self._trainer: Any = None
        self._epoch: float = 0.0
        self.converted: list[str] = []

    # --------------------------------------------------------------------------------------------- the state
    def _state(self) -> dict[str, Any]:
        trainer = self._trainer
        connector = getattr(trainer, "_checkpoint_connector", None)
        if connector is not None and hasattr(connector, "dump_checkpoint"):
            ckpt = connector.dump_checkpoint(weights_only=False)
        else:  # a Lightning without the connector: the essentials, resumable by hand
            ckpt = {
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "state_dict": trainer.lightning_module.state_dict(),
                "optimizer_states": [o.state_dict() for o in trainer.optimizers],
                "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            }
        self.converted = []
        out: dict[str, Any] = storable(ckpt, "", self.converted)
        return out

    def _metrics(self, trainer: Any) -> dict[str, Any]:
        return dict(getattr(trainer, "callback_metrics", {}) or {})

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Here (not in setup) the model is on its device and the optimizers exist.
        self._trainer = trainer
        if self.recorder is not None:
            return
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        meta = dict(self.metadata)
        if hparams and "hparams" not in meta:
            meta["hparams"] = storable_json(hparams)
        meta.setdefault("source", {"kind": "lightning", "version": pl.__version__})
        self._open_recorder(meta, model=pl_module, optimizer=None, state=self._state)
        assert self.recorder is not None
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        schedulers = list(getattr(trainer, "lr_scheduler_configs", []) or [])
        self.recorder.optimizer = optimizers[0] if optimizers else None  # for lr/step counters in the metadata
        self.recorder.scheduler = schedulers[0].scheduler if schedulers else None

    def _ask(self, trainer: Any, *, epoch: float, is_last: bool = False) -> None:
        if self.recorder is None or getattr(trainer, "sanity_checking", False):
            return
        if not getattr(trainer, "is_global_zero", True):
            return
        self._epoch = epoch
        self.recorder.step(trainer.global_step, epoch=epoch, metrics=self._metrics(trainer), is_last=is_last)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Epochs done, as a fraction (like transformers' state.epoch): the last batch of epoch 0 gives 1.0.
        n = trainer.num_training_batches
        done = (batch_idx + 1) / n if isinstance(n, int) and n > 0 else 0.0
        self._ask(trainer, epoch=trainer.current_epoch + min(done, 1.0))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self._ask(trainer, epoch=self._epoch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._ask(trainer, epoch=trainer.current_epoch + 1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._ask(trainer, epoch=trainer.current_epoch, is_last=True)
        self._wait()


def storable_json(obj: Any) -> Any:
    """Hyper-parameters as plain JSON for metadata (non-finite floats become None, objects strings)."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): storable_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [storable_json(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return storable_json(obj.item())
    return str(obj)


def export_ckpt(store: Store, ref: str, out: str | os.PathLike[str]) -> Path:
    """Write a stored Lightning checkpoint as a ``.ckpt`` file (``trainer.fit(model, ckpt_path=out)`` resumes)."""
    state = store.load(ref, tensors="torch")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(out)
    return out
