"""The PyTorch adapter: tensors ↔ store leaves, and model/optimizer/scheduler/scaler/RNG ↔ checkpoint state.

``import ckptstore`` never imports torch; this module does, and only when a torch tensor is saved or asked for.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from ckptstore.errors import ForeignCheckpointError, InvalidStateError
from ckptstore.format.manifest import CheckpointInfo
from ckptstore.format.tree import Leaf

_TORCH_TO_NAME: dict[torch.dtype, str] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}
for _n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _n):
        _TORCH_TO_NAME[getattr(torch, _n)] = _n
_NAME_TO_TORCH = {v: k for k, v in _TORCH_TO_NAME.items()}
# The signed integer type of each width: torch.from_numpy and Tensor.view go through these.
_INT_OF_WIDTH = {
    1: (torch.uint8, np.uint8),
    2: (torch.int16, np.int16),
    4: (torch.int32, np.int32),
    8: (torch.int64, np.int64),
}


# dtypes numpy also has, and the unsigned words their bytes are stored as: a contiguous CPU tensor of one of these
# converts through .numpy() (one call instead of view/numpy/view; an async save's snapshot pays this per tensor)
_NUMPY_WORDS: dict[torch.dtype, str | None] = {
    torch.float64: "<u8", torch.float32: "<u4", torch.float16: "<u2", torch.int64: "<u8", torch.int32: "<u4",
    torch.int16: "<u2", torch.int8: "<u1", torch.uint8: "<u1", torch.bool: None,
}  # fmt: skip


def tensor_to_leaf(t: Any) -> Leaf:
    """A torch tensor as a store leaf (zero-copy for contiguous CPU tensors)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidStateError(f"not a torch tensor: {type(t).__name__}")
    words = _NUMPY_WORDS.get(t.dtype, "")
    if words != "" and t.is_cpu and t.layout == torch.strided and t.is_contiguous():
        arr = (t.detach() if t.requires_grad else t).numpy().reshape(-1)
        return Leaf(_TORCH_TO_NAME[t.dtype], tuple(t.shape), arr if words is None else arr.view(words), "torch")
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise InvalidStateError(
            f"cannot store a {t.layout} / quantized / meta tensor", hint="convert it to a dense tensor first"
        )
    name = _TORCH_TO_NAME.get(t.dtype)
    if name is None:
        raise InvalidStateError(f"unsupported torch dtype {t.dtype}")
    shape = tuple(int(s) for s in t.shape)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    t = t.contiguous().reshape(-1)
    if t.dtype in (torch.complex64, torch.complex128):
        data = t.view(torch.float32 if t.dtype == torch.complex64 else torch.float64).numpy().view(np.uint64)
    elif t.dtype == torch.bool:
        data = t.numpy()
    else:
        size = t.element_size()
        as_int, _ = _INT_OF_WIDTH[size]
        data = t.view(as_int).numpy().view(f"<u{size}")
    return Leaf(name, shape, data, "torch")


def leaf_to_tensor(leaf: Leaf) -> torch.Tensor:
    """A store leaf as a torch tensor of the original dtype and shape (sharing the leaf's memory)."""
    dt = _NAME_TO_TORCH.get(leaf.dtype)
    if dt is None:
        raise InvalidStateError(f"torch has no dtype {leaf.dtype}")
    data = np.ascontiguousarray(leaf.data)
    if not data.flags.writeable:
        data = data.copy()
    if dt == torch.bool:
        t = torch.from_numpy(data.view(np.bool_))
    else:
        t = torch.from_numpy(data.view(_view_int(dt))).view(dt)
    return t.reshape(leaf.shape)


@functools.cache
def _view_int(dt: torch.dtype) -> type[np.integer[Any]]:
    """The numpy integer type a tensor of ``dt`` is made through (a load converts hundreds of tensors: asking
    torch for the element size each time cost a tensor allocation per tensor)."""
    size = torch.empty((), dtype=dt).element_size()
    return _INT_OF_WIDTH[8 if size == 16 else size][1]  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- training state
def rng_state() -> dict[str, Any]:
    """Every RNG a training loop usually draws from: python, numpy, torch CPU, and each CUDA device."""
    state: dict[str, Any] = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": np.array(internal, dtype=np.uint64), "gauss_next": gauss}


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "kind": kind,
        "keys": np.asarray(keys),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state.get("python")
    if py:
        random.setstate(
            (int(py["version"]), tuple(int(x) for x in np.asarray(py["internal"]).tolist()), py["gauss_next"])
        )
    npst = state.get("numpy")
    if npst:
        np.random.set_state(
            (npst["kind"], np.asarray(npst["keys"]), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(_as_tensor(state["torch"]).to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_as_tensor(s).to(torch.uint8) for s in state["cuda"]])


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def training_state(
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> dict[str, Any]:
    """Collect what a resume needs into one state dict (the layout :func:`restore_training_state` reads)."""
    state: dict[str, Any] = {}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if extra:
        state["extra"] = dict(extra)
    if rng:
        state["rng"] = rng_state()
    return state


def restore_training_state(
    state: Mapping[str, Any],
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    rng: bool = True,
) -> dict[str, Any]:
    """Load a state made by :func:`training_state` into live objects; returns ``extra``."""
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
    return dict(state.get("extra", {}))


class TrainingStore(Protocol):
    """The part of :class:`ckptstore.store.Store` that :func:`save` and :func:`restore` use (a protocol: the store
    imports this module to make torch tensors, so this module does not import the store)."""

    def save(self, run: str, step: int, state: Any, metadata: Mapping[str, Any] | None = None) -> CheckpointInfo: ...
    def load(self, ref: str, *, tensors: str | None = None) -> Any: ...


def save(
    store: TrainingStore,
    run: str,
    step: int,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    extra: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    capture: bool = True,
) -> CheckpointInfo:
    """Save model + optimizer + scheduler + scaler + RNG states as ``run@step``.

    ``metrics`` (name → number; tensors are fine) go into ``metadata["metrics"]``. With ``capture`` the metadata
    also records what this process knows about itself (:func:`ckptstore.metadata.capture`: step, LR per param
    group, optimizer/scheduler counters, AMP scale, command line, package versions, hardware, git state of the
    training code); keys given in ``metadata`` win. See docs/metadata.md.
    """
    from ckptstore import metadata as md

    if capture:
        meta = md.capture(step, optimizer, scheduler, scaler, metadata=metadata, metrics=metrics)
    else:
        meta = dict(metadata or {})
        if metrics:
            meta["metrics"] = {**(meta.get("metrics") or {}), **md.metric_values(metrics)}
    return store.save(run, step, training_state(model, optimizer, scheduler, scaler, extra=extra), metadata=meta)


def restore(
    store: TrainingStore,
    ref: str,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    rng: bool = True,
) -> dict[str, Any]:
    """Restore live objects from ``ref``; returns the ``extra`` values that were saved with it."""
    state = store.load(ref, tensors="torch")
    return restore_training_state(state, model, optimizer, scheduler, scaler, rng=rng)


def _sentences(text: str, limit: int = 300) -> str:
    """A foreign message on one line, cut only between sentences (torch's weights_only refusal runs to 40 lines;
    its first sentences say what is wrong)."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", flat):
        if out and len(out) + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
    return out


def load_pt(path: str, *, mmap: bool = False) -> Any:
    """Read a foreign ``.pt`` file safely: ``weights_only=True``, and a clear error when torch refuses it.

    ``mmap=True`` maps the file instead of reading it, so tensors cost memory only when touched (zip-format files;
    old-format files fall back to a plain read)."""
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]", "", str(exc)).strip()
        msg = _sentences(text) if text else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "UnpicklingError" in repr(type(exc)):
            raise ForeignCheckpointError(
                f"refused to load: the file contains objects other than tensors and plain data ({msg})",
                path=path,
                hint="ckptstore only reads .pt files that torch.load(weights_only=True) accepts",
            ) from None
        raise ForeignCheckpointError(
            f"not a readable PyTorch checkpoint ({type(exc).__name__}: {msg})",
            path=path,
            hint="the file may be truncated or not a .pt file",
        ) from None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors have the same dtype, shape and raw bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(
        torch.equal(
            a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
            b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        )
    )
