"""What the Lightning and transformers callbacks share: their options and how they open the Recorder."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptstore.policy.retention import RetentionPolicy
from ckptstore.policy.save import SavePolicy
from ckptstore.recorder import Recorder
from ckptstore.store import Store


class RecorderCallback:
    """A mixin: ``store`` (a :class:`~ckptstore.Store` or a path, created if missing), ``run``, the save
    ``policy`` and retention ``keep`` (text or object forms of :mod:`ckptstore.policy`), ``metadata`` added to every
    checkpoint, ``record_path`` and ``async_save`` (saves return once the state is snapshotted; see
    :class:`~ckptstore.recorder.Recorder`); the Recorder itself is made at the start of training, when the model
    exists. At the end of training the callback waits for the save in flight."""

    recorder: Recorder | None

    def _set_options(
        self,
        store: Store | str | os.PathLike[str],
        run: str,
        *,
        policy: str | SavePolicy,
        keep: str | RetentionPolicy | Sequence[Any] | None,
        metadata: Mapping[str, Any] | None,
        record_path: bool,
        async_save: bool = True,
    ) -> None:
        self._store_arg = store
        self.run = run
        self.policy = policy
        self.keep = keep
        self.metadata = dict(metadata or {})
        self.record_path = record_path
        self.async_save = async_save
        self.recorder = None

    def _open_recorder(self, metadata: Mapping[str, Any], **objects: Any) -> Recorder:
        """The Recorder for this run (``objects``: model, optimizer, scheduler, state as :class:`Recorder` takes)."""
        store = self._store_arg if isinstance(self._store_arg, Store) else Path(self._store_arg)
        self.recorder = Recorder(store, self.run, policy=self.policy, keep=self.keep, metadata=metadata,
                                 record_path=self.record_path, async_save=self.async_save, **objects)  # fmt: skip
        return self.recorder

    def _wait(self) -> None:
        """The end of training: the last save is committed (and its failure raised) before the trainer returns."""
        if self.recorder is not None:
            self.recorder.wait()
