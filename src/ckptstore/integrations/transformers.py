"""Hugging Face ``transformers``: a ``TrainerCallback`` that saves the training state into a store by policy.

>>> from ckptstore.integrations.transformers import CkptStoreCallback
>>> cb = CkptStoreCallback("runs.ckpt", "bert-tiny", policy="log:2:then=500, best:eval_loss, last",
...                        keep="log:2,best:eval_loss,last:2")
>>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()   # doctest: +SKIP

Each checkpoint holds ``model`` (the state dict), ``optimizer``, ``scheduler``, ``trainer_state`` (the
``TrainerState`` as JSON) and ``rng``. :func:`export_checkpoint_dir` writes them back as a ``checkpoint-N``
folder (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``, ``rng_state.pth``,
``config.json``) that ``trainer.train(resume_from_checkpoint=...)`` resumes from. The policy is asked at every
step end (``state.global_step``, ``state.epoch``) with the latest logged values (``loss``, ``learning_rate``,
``grad_norm``, ``eval_*``), and again when logs and evaluations arrive — their metrics are added to the step's
checkpoint if it was already saved. The Trainer's own ``save_strategy`` is independent; set it to ``"no"`` to
let the store hold the checkpoints alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:
    from ckptstore.errors import MissingDependencyError

    raise MissingDependencyError(
        "the transformers integration needs Hugging Face transformers", hint="pip install transformers"
    ) from None

import numpy as np
import torch

from ckptstore.integrations._callback import RecorderCallback
from ckptstore.policy.retention import RetentionPolicy
from ckptstore.policy.save import SavePolicy
from ckptstore.recorder import plain_metrics
from ckptstore.store import Store
from ckptstore.torch import rng_state

__all__ = ["CkptStoreCallback", "export_checkpoint_dir"]


class CkptStoreCallback(RecorderCallback, TrainerCallback):
    """Save ``Trainer`` checkpoints into a ckptstore store by policy (see the module docs)."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        run: str,
        *,
        policy: str | SavePolicy = "steps:500, last",
        keep: str | RetentionPolicy | Sequence[Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        record_path: bool = True,
        async_save: bool = True,
    ) -> None:
        self._set_options(
            store, run, policy=policy, keep=keep, metadata=metadata, record_path=record_path, async_save=async_save
        )
        self.metrics: dict[str, float] = {}
        self._objs: dict[str, Any] = {}

    def _state(self) -> dict[str, Any]:
        model, opt, sched, tstate = (self._objs.get(k) for k in ("model", "optimizer", "lr_scheduler", "state"))
        assert model is not None, "on_train_begin sets the model"
        state: dict[str, Any] = {"model": model.state_dict()}
        if opt is not None:
            state["optimizer"] = opt.state_dict()
        if sched is not None:
            state["scheduler"] = sched.state_dict()
        if tstate is not None:
            # what TrainerState.save_to_json writes (a dataclass of plain values)
            state["trainer_state"] = json.loads(json.dumps(dataclasses.asdict(tstate), sort_keys=True))
        state["rng"] = rng_state()
        return state

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        self._objs.update(model=model, optimizer=kwargs.get("optimizer"), lr_scheduler=kwargs.get("lr_scheduler"),
                          state=state)  # fmt: skip
        if self.recorder is not None or model is None or not state.is_world_process_zero:
            return
        meta = dict(self.metadata)
        meta.setdefault("hparams", json.loads(args.to_json_string()))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            meta.setdefault("hf_config", json.loads(config.to_json_string()))
        meta.setdefault("source", {"kind": "transformers"})
        self._open_recorder(meta, model=model, optimizer=kwargs.get("optimizer"), scheduler=kwargs.get("lr_scheduler"),
                            state=self._state)  # fmt: skip

    def _ask(self, state: Any, *, is_last: bool = False) -> None:
        if self.recorder is None:
            return
        is_last = is_last or (state.max_steps > 0 and state.global_step >= state.max_steps)
        self.recorder.step(state.global_step, epoch=state.epoch, metrics=self.metrics, is_last=is_last)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ask(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.metrics.update(plain_metrics({k: v for k, v in (logs or {}).items() if k != "epoch"}))
        self._ask(state)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.metrics.update(plain_metrics({k: v for k, v in (metrics or {}).items() if k != "epoch"}))
        self._ask(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ask(state, is_last=True)
        self._wait()


def _python_rng(st: Mapping[str, Any]) -> tuple[Any, ...]:
    """``random.getstate()`` back from ``ckptstore.torch.rng_state()``'s form."""
    return (int(st["version"]), tuple(int(x) for x in np.asarray(st["internal"]).tolist()), st["gauss_next"])


def export_checkpoint_dir(store: Store, ref: str, out: str | os.PathLike[str]) -> Path:
    """Write a stored checkpoint as a transformers ``checkpoint-N`` folder that
    ``Trainer.train(resume_from_checkpoint=out)`` resumes from."""
    from safetensors.torch import save_file

    m = store.resolve(ref)
    state = store.load(m.ref, tensors="torch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    if "optimizer" in state:
        torch.save(state["optimizer"], out / "optimizer.pt")
    if "scheduler" in state:
        torch.save(state["scheduler"], out / "scheduler.pt")
    if "trainer_state" in state:
        (out / "trainer_state.json").write_text(json.dumps(state["trainer_state"], indent=2) + "\n")
    rng = state.get("rng")
    if isinstance(rng, Mapping) and "python" in rng and "numpy" in rng and "torch" in rng:
        npst = rng["numpy"]
        torch.save(
            {
                "python": _python_rng(rng["python"]),
                "numpy": (npst["kind"], np.asarray(npst["keys"]), int(npst["pos"]), int(npst["has_gauss"]),
                          float(npst["cached_gaussian"])),
                "cpu": rng["torch"],
            },
            out / "rng_state.pth",
        )  # fmt: skip
    config = m.metadata.get("hf_config")
    if isinstance(config, Mapping):
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
