"""ckptstore: keep the whole trajectory of a training run, losslessly, at a fraction of the storage.

>>> import ckptstore
>>> store = ckptstore.create_store("runs.ckpt")          # doctest: +SKIP
>>> store.save("clip", 1000, state, {"epoch": 1})        # doctest: +SKIP
>>> state = store.load("clip@latest")                    # doctest: +SKIP

``import ckptstore`` does not import torch; torch tensors are handled by :mod:`ckptstore.torch` on demand.
"""

from ckptstore.errors import CkptStoreError
from ckptstore.format.manifest import CheckpointInfo, Manifest
from ckptstore.refs import Ref, parse_ref
from ckptstore.store import Store, create_store, open_store

__version__ = "0.1.0"

__all__ = [
    "CheckpointInfo",
    "CkptStoreError",
    "Manifest",
    "Ref",
    "Store",
    "__version__",
    "create_store",
    "open_store",
    "parse_ref",
]
