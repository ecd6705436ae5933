"""Checkpoint metadata: the versioned schema, its validation, and capture of the training environment.

Every checkpoint carries a JSON object describing its training state (``docs/metadata.md`` is the reference):
counters (``step``, ``epoch``, ``samples_seen`` ...), optimisation (``lr`` per param group, ``loss``,
``grad_norm``), eval ``metrics``, ``hparams`` and ``command``, provenance (``code``, ``versions``, ``hardware``)
and bookkeeping (``save_reason``, ``tags``, ``notes``). :func:`validate` checks the known fields and passes unknown
keys through unchanged, so callers may add their own. It runs on every save and every metadata edit, and names
the offending field when it refuses something.

JSON has no NaN or infinity. Only ``loss.last``, ``loss.avg`` and ``grad_norm`` may be non-finite (a diverged
run is worth recording); they are stored tagged as ``{"$float": "nan"}`` like floats in the state tree, and
:func:`decode` turns the tags back into floats. Everywhere else a non-finite number is an error.

This module does not import torch: :func:`capture` reads optimizers and schedulers by duck typing and asks torch
about devices only when the training process has already imported it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeGuard

from ckptstore.errors import InvalidMetadataError
from ckptstore.util import jsonable

if TYPE_CHECKING:
    from ckptstore.format.manifest import Manifest

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_NOTES_BYTES",
    "MAX_TAG_LENGTH",
    "NONFINITE_FIELDS",
    "SCHEMA_VERSION",
    "add_tags",
    "capture",
    "check_tag",
    "decode",
    "git_state",
    "hardware",
    "merge",
    "metric_values",
    "optimizer_lrs",
    "package_versions",
    "remove_tags",
    "set_notes",
    "validate",
]

#: Version of the metadata schema this module writes and fully understands. Absent ``schema`` means 1.
SCHEMA_VERSION = 1
#: Limits (UTF-8 bytes of the compact JSON / of the text).
MAX_METADATA_BYTES = 4 * 1024 * 1024
MAX_NOTES_BYTES = 64 * 1024
MAX_TAG_LENGTH = 128
# Metric, counter and version names, in characters (docs/metadata.md). A metadata-schema limit, not the
# format's MAX_NAME_LENGTH (255 UTF-8 bytes, format/spec.py); kept at 256 so stores already written stay valid.
MAX_METADATA_NAME_LENGTH = 256
MAX_TEXT_LENGTH = 4096  # save_reason, model, code.branch ...
#: Dotted paths of the only values that may be NaN or infinite.
NONFINITE_FIELDS = ("loss.last", "loss.avg", "grad_norm")

_FLOAT_TAG = "$float"
_NONFINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_TAG_RE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")
_HEX_RE = re.compile(r"^[0-9a-f]{4,64}$")


# ------------------------------------------------------------------------------------------------ validation
def _fail(field: str, message: str, hint: str | None = None) -> NoReturn:
    raise InvalidMetadataError(f"metadata field {field!r}: {message}", field=field, hint=hint)


def _kind(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """A number, or a tagged non-finite float, as a Python float; None for anything else."""
    if _is_number(value):
        return float(value)
    if isinstance(value, Mapping) and len(value) == 1 and value.get(_FLOAT_TAG) in _NONFINITE_NAMES:
        return _NONFINITE_NAMES[value[_FLOAT_TAG]]
    return None


def _plain(value: Any, field: str) -> Any:
    """Any JSON value with finite numbers, copied (tuples become lists, int keys become strings)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            _fail(
                field,
                f"non-finite number {value!r}",
                hint=f"only {', '.join(NONFINITE_FIELDS)} may be NaN or infinite; use null for a missing value",
            )
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | int):
                _fail(field, f"key {k!r} is a {_kind(k)}; metadata keys are strings")
            out[str(k)] = _plain(v, f"{field}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{field}.{i}") for i, v in enumerate(value)]
    hint = "use plain numbers, strings, bools, None, lists and dicts"
    if hasattr(value, "item") and hasattr(value, "dtype"):
        hint = "call .item() on numpy/torch scalars"
    _fail(field, f"a {_kind(value)} is not JSON", hint=hint)


def _int(value: Any, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"expected an integer >= {minimum}, got {_kind(value)} {value!r:.60}")
    if value < minimum:
        _fail(field, f"expected an integer >= {minimum}, got {value}")
    return value


def _number(value: Any, field: str, *, minimum: float | None = 0.0, nonfinite: bool = False) -> Any:
    """A finite number >= ``minimum``; with ``nonfinite`` also NaN/±inf, returned tagged."""
    f = _as_float(value)
    if f is None:
        _fail(field, f"expected a number, got {_kind(value)} {value!r:.60}")
    if not math.isfinite(f):
        if not nonfinite:
            _fail(
                field,
                f"non-finite number {f!r}",
                hint=f"only {', '.join(NONFINITE_FIELDS)} may be NaN or infinite; use null for a missing value",
            )
        return {_FLOAT_TAG: repr(f)}
    if minimum is not None and f < minimum:
        _fail(field, f"expected a number >= {minimum:g}, got {value!r}")
    return value


def _text(value: Any, field: str, max_bytes: int = MAX_TEXT_LENGTH) -> str:
    if not isinstance(value, str):
        _fail(field, f"expected a string, got {_kind(value)}")
    n = len(value.encode("utf-8", "surrogatepass"))
    if n > max_bytes:
        _fail(field, f"{n} bytes, more than the {max_bytes} allowed")
    return value


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(field, f"expected an object (dict), got {_kind(value)}")
    for k in value:
        if not isinstance(k, str):
            _fail(field, f"key {k!r} is a {_kind(k)}; metadata keys are strings")
    return value


def _record(
    value: Any, field: str, known: Mapping[str, Callable[[Any, str], Any]], *, nullable: bool = True
) -> dict[str, Any]:
    """An object whose ``known`` members are checked and whose other members are kept as plain JSON."""
    out: dict[str, Any] = {}
    for k, v in _object(value, field).items():
        check = known.get(k)
        sub = f"{field}.{k}"
        out[k] = None if v is None and nullable else check(v, sub) if check else _plain(v, sub)
    return out


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_METADATA_NAME_LENGTH or not value.isprintable():
        _fail(field, f"names are 1 to {MAX_METADATA_NAME_LENGTH} printable characters, got {value!r:.80}")
    return value


def _v_schema(value: Any, field: str) -> int:
    v = _int(value, field, 1)
    if v > SCHEMA_VERSION:
        _fail(field, f"schema version {v} is newer than this ckptstore's {SCHEMA_VERSION}", hint="upgrade ckptstore")
    return v


def _v_epoch(value: Any, field: str) -> int | float:
    if isinstance(value, int) and not isinstance(value, bool):
        return _int(value, field)
    out = _number(value, field)  # fractional epochs (2.5) are allowed
    assert isinstance(out, int | float)
    return out


def _v_lr(value: Any, field: str) -> Any:
    if isinstance(value, list | tuple):
        if not value:
            _fail(field, "an empty list; give one learning rate per param group")
        return [_number(v, f"{field}.{i}") for i, v in enumerate(value)]
    return _number(value, field)


def _v_loss(value: Any, field: str) -> dict[str, Any]:
    if _as_float(value) is not None:
        _fail(field, "expected an object such as {'last': 0.71, 'avg': 0.74, 'window': 100}, got a number")
    return _record(
        value,
        field,
        {
            "last": lambda v, f: _number(v, f, minimum=None, nonfinite=True),
            "avg": lambda v, f: _number(v, f, minimum=None, nonfinite=True),
            "window": lambda v, f: _int(v, f, 1),
        },
    )


def _v_metrics(value: Any, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in _object(value, field).items():
        sub = f"{field}.{k}"
        _name(k, sub)
        if v is None:
            out[k] = None
        elif isinstance(v, Mapping | list | tuple | str | bool) or _as_float(v) is None:
            _fail(sub, f"a metric is a number or null, got {_kind(v)}", hint="name nested metrics 'group/name'")
        else:
            out[k] = _number(v, sub, minimum=None)
    return out


def _v_counters(value: Any, field: str) -> dict[str, int]:
    return {_name(k, f"{field}.{k}"): _int(v, f"{field}.{k}") for k, v in _object(value, field).items()}


def _v_command(value: Any, field: str) -> str | list[str]:
    if isinstance(value, list | tuple):
        return [_text(v, f"{field}.{i}", MAX_METADATA_BYTES) for i, v in enumerate(value)]
    return _text(value, field, MAX_METADATA_BYTES)


def _v_commit(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _HEX_RE.match(value):
        _fail(field, f"expected a lowercase hex commit id (4 to 64 digits), got {value!r:.80}")
    return value


def _v_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        _fail(field, f"expected true or false, got {_kind(value)}")
    return value


def _v_versions(value: Any, field: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in _object(value, field).items():
        sub = f"{field}.{k}"
        _name(k, sub)
        out[k] = None if v is None else _text(v, sub, MAX_METADATA_NAME_LENGTH)
    return out


def _v_devices(value: Any, field: str) -> list[str]:
    if not isinstance(value, list | tuple):
        _fail(field, f"expected a list of device names, got {_kind(value)}")
    return [_text(v, f"{field}.{i}", MAX_METADATA_NAME_LENGTH) for i, v in enumerate(value)]


def _v_tags(value: Any, field: str) -> list[str]:
    if not isinstance(value, list | tuple):
        _fail(field, f"expected a list of strings, got {_kind(value)}")
    seen: set[str] = set()
    for i, tag in enumerate(value):
        check_tag(tag, f"{field}.{i}")
        if tag in seen:
            _fail(f"{field}.{i}", f"tag {tag!r} appears twice")
        seen.add(tag)
    return list(value)


def check_tag(tag: Any, field: str = "tags") -> str:
    """A tag is 1 to 128 characters without whitespace or control characters (it appears in ``RUN@tag:NAME``)."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or len(tag) > MAX_TAG_LENGTH:
        _fail(field, f"invalid tag {tag!r:.80}", hint=f"tags are 1 to {MAX_TAG_LENGTH} characters without spaces")
    return tag


_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "schema": _v_schema,
    "step": _int,
    "epoch": _v_epoch,
    "samples_seen": _int,
    "tokens_seen": _int,
    "wall_time": _number,
    "lr": _v_lr,
    "loss": _v_loss,
    "grad_norm": lambda v, f: _number(v, f, nonfinite=True),
    "loss_scale": _number,
    "metrics": _v_metrics,
    "eval_samples": _int,
    "counters": _v_counters,
    "hparams": lambda v, f: _plain(_object(v, f), f),
    "command": _v_command,
    "code": lambda v, f: _record(v, f, {"commit": _v_commit, "dirty": _v_bool, "branch": _text, "repo": _text}),
    "versions": _v_versions,
    "hardware": lambda v, f: _record(
        v,
        f,
        {
            "devices": _v_devices,
            "device_count": _int,
            "cpu_count": _int,
            "world_size": lambda x, g: _int(x, g, 1),
            "rank": _int,
            "accelerator": _text,
            "cpu": _text,
            "platform": _text,
        },
    ),
    "save_reason": _text,
    "tags": _v_tags,
    "notes": lambda v, f: _text(v, f, MAX_NOTES_BYTES),
    "model": _text,
    "source": lambda v, f: _plain(_object(v, f), f),
}
_NOT_NULLABLE = ("schema", "tags")


def validate(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check metadata against the schema and return the copy to store.

    Known fields must have their documented types; unknown keys are kept, as long as they are plain JSON with
    finite numbers. Non-finite values of :data:`NONFINITE_FIELDS` come back tagged. Raises
    :class:`~ckptstore.errors.InvalidMetadataError` naming the field (``metrics.acc``, ``lr.1``, ``notes`` ...).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadataError(f"metadata must be a dict, got {_kind(metadata)}", field="")
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            _fail(str(key), f"key {key!r} is a {_kind(key)}; metadata keys are strings")
        check = _FIELDS.get(key)
        if check is None:
            out[key] = _plain(value, key)
        elif value is None and key not in _NOT_NULLABLE:
            out[key] = None
        else:
            out[key] = check(value, key)
    size = len(json.dumps(out, separators=(",", ":"), allow_nan=False).encode())
    if size > MAX_METADATA_BYTES:
        biggest = max(out, key=lambda k: len(json.dumps(out[k])))
        raise InvalidMetadataError(
            f"metadata is {size} bytes as JSON, more than the {MAX_METADATA_BYTES} allowed "
            f"(largest field: {biggest!r})",
            field=biggest,
            hint="keep large artefacts in files and store their paths",
        )
    return out


def decode(metadata: Any) -> Any:
    """A copy of stored metadata with tagged non-finite floats (``{"$float": "nan"}``) turned back into floats."""
    if isinstance(metadata, Mapping):
        f = _as_float(metadata) if len(metadata) == 1 and _FLOAT_TAG in metadata else None
        if f is not None:
            return f
        return {k: decode(v) for k, v in metadata.items()}
    if isinstance(metadata, list):
        return [decode(v) for v in metadata]
    return metadata


# --------------------------------------------------------------------------------------------------- capture
def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``override``, merging nested dicts, so a caller's value wins key by key."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _scalar(value: Any) -> Any:
    """Python number from a torch/numpy scalar (``loss.item()`` done for the caller)."""
    if not isinstance(value, bool | int | float | str) and value is not None and hasattr(value, "item"):
        return value.item()
    return value


def metric_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics with torch/numpy scalars turned into Python numbers (so ``loss.detach()`` can be passed as is)."""
    return {str(k): _scalar(v) for k, v in metrics.items()}


def optimizer_lrs(optimizer: Any) -> list[float]:
    """The learning rate of each param group (``optimizer.param_groups[i]["lr"]``), as Python floats."""
    out = []
    for group in getattr(optimizer, "param_groups", []) or []:
        lr = _scalar(group.get("lr")) if isinstance(group, Mapping) else None
        if _is_number(lr):
            out.append(float(lr))
    return out


def optimizer_steps(optimizer: Any) -> int | None:
    """Updates the optimizer has applied, from its per-parameter ``step`` state (Adam, AdamW ...), if it keeps one."""
    best: int | None = None
    for st in (getattr(optimizer, "state", {}) or {}).values():
        s = _scalar(st.get("step")) if isinstance(st, Mapping) else None
        if _is_number(s) and math.isfinite(s):
            best = max(best or 0, int(s))
    return best


def package_versions() -> dict[str, str | None]:
    """python, ckptstore, numpy, torch, CUDA/cuDNN (as torch sees them) and open_clip, where installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for label, dist in (("ckptstore", "ckptstore"), ("numpy", "numpy"), ("torch", "torch"),
                        ("open_clip", "open_clip_torch")):  # fmt: skip
        mod = sys.modules.get(label)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if not isinstance(version, str):
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        out[label] = version
    torch = sys.modules.get("torch")
    if torch is not None:
        out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
        try:
            cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
            out["cudnn"] = None if cudnn is None else str(cudnn)
        except Exception:  # a broken CUDA install must not stop a save
            pass
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU, accelerator device names, world size and rank of this process.

    Device names are read only when CUDA is already initialised, so capture never initialises CUDA itself (that
    would break a later ``fork``).
    """
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "accelerator": "cpu",
        "devices": [],
        "device_count": 0,
    }
    world, rank = int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0)
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                hw["accelerator"] = "cuda"
                hw["device_count"] = int(torch.cuda.device_count())
                if torch.cuda.is_initialized():
                    hw["devices"] = [torch.cuda.get_device_name(i) for i in range(hw["device_count"])]
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                hw["accelerator"] = "mps"
                hw["device_count"] = 1
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                world, rank = int(dist.get_world_size()), int(dist.get_rank())
        except Exception:  # a broken driver must not stop a save
            pass
    hw["world_size"] = max(1, world)
    hw["rank"] = max(0, rank)
    return hw


def _main_dir() -> Path:
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return Path(main_file).resolve().parent if main_file else Path.cwd()


@functools.lru_cache(maxsize=16)
def _git_state_at(where: str) -> dict[str, Any] | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # never take the index lock of a live repo

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", where, *args], capture_output=True, text=True, timeout=10, env=env, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit or not _HEX_RE.match(commit):
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    top = git("rev-parse", "--show-toplevel")
    out: dict[str, Any] = {"commit": commit, "dirty": bool(status) if status is not None else None}
    if branch and branch != "HEAD":
        out["branch"] = branch
    if top:
        out["repo"] = top
    return out


def git_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """Commit, dirty flag (tracked files changed), branch and top folder of the git checkout holding ``path``
    (default: the folder of the running script); None outside a checkout or without git. Cached per folder."""
    where = Path(path).resolve() if path is not None else _main_dir()
    if where.is_file():
        where = where.parent
    state = _git_state_at(str(where))
    return dict(state) if state is not None else None


def capture(
    step: int | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    hparams: Any = None,
    code_dir: str | os.PathLike[str] | None = None,
    git: bool = True,
) -> dict[str, Any]:
    """What a training process can record about itself, with the caller's ``metadata`` merged over it.

    Fills ``schema``, ``step``, ``lr`` (per param group), ``counters`` (optimizer updates, scheduler steps),
    ``loss_scale`` (an enabled AMP scaler), ``command`` (``sys.argv``), ``versions``, ``hardware`` and ``code``
    (git state of ``code_dir``, default the running script's folder). ``metrics`` are added to
    ``metadata["metrics"]``; torch/numpy scalars become numbers. ``hparams`` may be a dict or an
    ``argparse.Namespace``. The result is not validated here: the store validates on save.
    """
    got: dict[str, Any] = {"schema": SCHEMA_VERSION}
    if step is not None:
        got["step"] = int(step)
    counters: dict[str, int] = {}
    if optimizer is not None:
        lrs = optimizer_lrs(optimizer)
        if lrs:
            got["lr"] = lrs
        n = optimizer_steps(optimizer)
        if n is not None:
            counters["optimizer_steps"] = n
    last_epoch = getattr(scheduler, "last_epoch", None)
    if _is_number(last_epoch) and int(last_epoch) >= 0:
        counters["scheduler_steps"] = int(last_epoch)
    if counters:
        got["counters"] = counters
    if scaler is not None:
        try:
            if scaler.is_enabled():
                got["loss_scale"] = float(scaler.get_scale())
        except Exception:  # not a GradScaler after all
            pass
    got["command"] = [str(a) for a in sys.argv]
    got["versions"] = package_versions()
    got["hardware"] = hardware()
    if git:
        code = git_state(code_dir)
        if code is not None:
            got["code"] = code
    if hparams is not None:
        got["hparams"] = jsonable(vars(hparams) if hasattr(hparams, "__dict__") else hparams, other=str)
    out = merge(got, metadata or {})
    if metrics:
        out["metrics"] = {**(out.get("metrics") or {}), **metric_values(metrics)}
    return out


# ------------------------------------------------------------------------------------------- editing in place
class EditableStore(Protocol):
    """The part of :class:`ckptstore.store.Store` the editing helpers use (a protocol: ``store.py`` imports this
    module, so this module does not import it)."""

    def resolve(self, ref: str) -> Manifest: ...
    def steps(self, run: str) -> list[int]: ...
    def manifest(self, run: str, step: int) -> Manifest: ...
    def update_metadata(self, ref: str, update: Callable[[dict[str, Any]], None]) -> Manifest: ...


def edit_tags(md: dict[str, Any], *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
    """Take ``remove`` off and append ``add`` (in order, each once) to a metadata dict's tags, in place; no tags
    left means no ``tags`` key. The one place tags are edited (``ckpt tag``/``untag``, pinning)."""
    drop = set(remove)
    tags = [t for t in md.get("tags") or [] if t not in drop]
    tags += [t for t in dict.fromkeys(add) if t not in tags]
    if tags:
        md["tags"] = tags
    else:
        md.pop("tags", None)


def add_tags(store: EditableStore, ref: str, tags: Iterable[str], *, move: bool = False) -> Manifest:
    """Tag a checkpoint (tensors untouched). With ``move`` the tags are first taken off the run's other
    checkpoints, so ``RUN@tag:NAME`` names this one only. Returns the new manifest."""
    tags = [check_tag(t) for t in tags]
    target = store.resolve(ref)

    new = store.update_metadata(target.ref, lambda md: edit_tags(md, add=tags))
    if move:
        for step in store.steps(target.run):
            if step != target.step and set(tags) & set(store.manifest(target.run, step).metadata.get("tags") or []):
                remove_tags(store, f"{target.run}@{step}", tags)
    return new


def remove_tags(store: EditableStore, ref: str, tags: Iterable[str]) -> Manifest:
    """Take tags off a checkpoint (absent tags are ignored). Returns the new manifest."""
    drop = list(tags)
    return store.update_metadata(ref, lambda md: edit_tags(md, remove=drop))


def set_notes(store: EditableStore, ref: str, text: str | None, *, append: bool = False) -> Manifest:
    """Replace (or with ``append`` add a line to) a checkpoint's notes; None or "" clears them."""
    if text is not None and not isinstance(text, str):
        _fail("notes", f"expected a string, got {_kind(text)}")

    def edit(md: dict[str, Any]) -> None:
        new = text or ""
        if append:
            old = md.get("notes") or ""
            new = f"{old}\n{new}" if old and new else old or new
        if new:
            md["notes"] = new
        else:
            md.pop("notes", None)

    return store.update_metadata(ref, edit)
