"""OpenCLIP: ingest the ``epoch_N.pt`` files that ``open_clip_train`` writes, and export them back.

An ``open_clip_train`` checkpoint is a dict: ``epoch``, ``name``, ``state_dict``, ``optimizer`` and optionally
``scaler``, ``state_dict_ema``, ``global_step``, ``samples_seen``. It is stored as it is (every key, in order), so
an export writes a ``.pt`` that ``open_clip_train.main --resume`` and ``open_clip.create_model_and_transforms(...,
pretrained=PATH)`` read exactly like the original, every tensor bit-identical.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ckptstore.errors import CheckpointExistsError, CkptStoreError, ForeignCheckpointError
from ckptstore.format.manifest import CheckpointInfo
from ckptstore.store import Store

_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


def epoch_files(path: str | Path) -> list[Path]:
    """``epoch_N.pt`` files in a folder (a run folder or its ``checkpoints/``), by epoch; never ``epoch_latest``."""
    p = Path(path)
    if p.is_file():
        return [p]
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found = [(int(m.group(1)), f) for f in p.iterdir() if (m := _EPOCH_RE.match(f.name))]
    return [f for _, f in sorted(found)]


def run_dir_of(path: Path) -> Path:
    """The ``open_clip_train`` run folder (``logs/NAME``) that holds a checkpoint file."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def default_run_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", run_dir_of(path.resolve()).name).lstrip(".-") or "run"
    return name


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one ``epoch_N.pt`` safely and check that it looks like an open_clip_train checkpoint."""
    from ckptstore.torch import load_pt

    obj = load_pt(str(path))
    if not isinstance(obj, dict):
        raise ForeignCheckpointError(
            f"expected a dict, found {type(obj).__name__}",
            path=str(path),
            hint="is this an open_clip_train epoch_N.pt?",
        )
    if "state_dict" not in obj or not isinstance(obj["state_dict"], Mapping):
        raise ForeignCheckpointError(
            "no 'state_dict' in the checkpoint",
            path=str(path),
            hint="open_clip_train checkpoints hold epoch, name, state_dict, optimizer",
        )
    return obj


def parse_params_txt(path: Path) -> dict[str, Any]:
    """``params.txt`` (``key: value`` lines written by open_clip_train) as a dict of strings/numbers."""
    out: dict[str, Any] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, val = line.partition(":")
        if not sep:
            continue
        val = val.strip()
        parsed: Any = val
        for conv in (int, float):
            try:
                parsed = conv(val)
                break
            except ValueError:
                pass
        if val in ("True", "False"):
            parsed = val == "True"
        elif val == "None":
            parsed = None
        if isinstance(parsed, float) and not math.isfinite(parsed):  # nan, inf: JSON has neither
            parsed = None
        out[key.strip()] = parsed
    return out


def epoch_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per-epoch eval metrics from ``results.jsonl`` (written when validation runs)."""
    out: dict[int, dict[str, float]] = {}
    f = run_dir / "checkpoints" / "results.jsonl"
    if not f.exists():
        f = run_dir / "results.jsonl"
    if not f.exists():
        return out
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "epoch" not in row:
            continue
        out[int(row["epoch"])] = {k: float(v) for k, v in row.items() if k != "epoch" and _finite(v)}
    return out


_LOG_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2},\d{2}:\d{2}:\d{2})")
_TRAIN_RE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
_LOSS_RE = re.compile(r"(?:^|\s)Loss: (\S+) \((\S+)\)")


def train_log(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Per completed epoch (1-based, as checkpoints count), what ``out.log``'s ``Train Epoch`` lines say:
    ``loss`` (the last logged total loss and the trainer's running mean over the epoch's logged steps, with
    ``window`` = how many), ``samples`` (seen in that epoch) and ``wall_time`` (seconds from the log's first line
    to the epoch's last training line). A later run in the same log overrides earlier lines of the same epoch."""
    f = run_dir / "out.log"
    out: dict[int, dict[str, Any]] = {}
    if not f.is_file():
        return out
    start: datetime.datetime | None = None
    for line in f.read_text(errors="replace").splitlines():
        tm = _LOG_TIME_RE.match(line)
        when = datetime.datetime.strptime(tm.group(1), "%Y-%m-%d,%H:%M:%S") if tm else None
        if start is None and when is not None:
            start = when
        m = _TRAIN_RE.search(line)
        if not m:
            continue
        epoch = int(m.group(1)) + 1  # the trainer logs 0-based epochs; checkpoints count completed ones
        rec = out.setdefault(epoch, {"window": 0})
        if int(m.group(2)) < rec.get("samples", 0):  # the epoch started again (a resumed run): start over
            rec = out[epoch] = {"window": 0}
        rec["samples"] = int(m.group(2))
        loss = _LOSS_RE.search(line)
        if loss:
            with contextlib.suppress(ValueError):
                rec["last"], rec["avg"] = float(loss.group(1)), float(loss.group(2))
                rec["window"] += 1
        if when is not None and start is not None:
            rec["wall_time"] = (when - start).total_seconds()
    return out


def _optimizer_steps(opt: Any) -> int | None:
    """Updates applied, from the per-parameter ``step`` of Adam-style optimizer state (a tensor or number)."""
    steps = []
    state = opt.get("state") if isinstance(opt, Mapping) else None
    for st in state.values() if isinstance(state, Mapping) else ():  # (fuzzing: a forged "state": 3 raised)
        s: Any = st.get("step") if isinstance(st, Mapping) else None
        if hasattr(s, "item") and getattr(s, "numel", lambda: 1)() == 1:
            s = s.item()
        if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s):
            steps.append(int(s))
    return max(steps) if steps else None


def checkpoint_metadata(ckpt: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Metadata (docs/metadata.md) for one ``epoch_N.pt``: the checkpoint's ``epoch``/``global_step``/
    ``samples_seen`` (or, as open_clip_train 3.x records neither of the last two, the optimizer's update count and
    ``params.txt``'s batch size), learning rate per param group, the run's ``params.txt`` as ``hparams``, the
    epoch's eval metrics from ``results.jsonl`` and its training loss and wall time from ``out.log``."""
    from ckptstore.metadata import SCHEMA_VERSION

    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "source": {"kind": "open_clip_train", "file": str(path.resolve())},
    }
    for key in ("epoch", "global_step", "samples_seen"):
        if isinstance(ckpt.get(key), int):
            meta[{"global_step": "step"}.get(key, key)] = int(ckpt[key])
    opt = ckpt.get("optimizer")
    if "step" not in meta:
        steps = _optimizer_steps(opt)
        if steps is not None:
            meta["step"] = steps
    if isinstance(opt, Mapping) and isinstance(opt.get("param_groups"), list):
        lrs = [float(g["lr"]) for g in opt["param_groups"] if isinstance(g, Mapping) and _finite(g.get("lr"))]
        if lrs:
            meta["lr"] = lrs
    if isinstance(ckpt.get("name"), str):
        meta["name"] = ckpt["name"]
    run_dir = run_dir_of(path.resolve())
    params = run_dir / "params.txt"
    hp: dict[str, Any] = {}
    if params.exists():
        hp = parse_params_txt(params)
        meta["hparams"] = hp
        if isinstance(hp.get("model"), str):
            meta["model"] = hp["model"]
            found = local_dir_config(hp["model"], run_dir, hp)
            if found is not None:  # the config is training state: keep it, the folder may move or go
                meta["model_config"], meta["source"]["model_config"] = found[0], str(found[1])
        world = hp.get("world_size")
        if isinstance(world, int) and world >= 1:
            device = hp.get("device")
            accelerator = str(device).split(":")[0] if isinstance(device, str) and device else "cpu"
            meta["hardware"] = {"world_size": world, "accelerator": accelerator}
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
    if "samples_seen" not in meta and isinstance(meta.get("step"), int):
        per_step = [hp.get(k, 1) for k in ("batch_size", "accum_freq", "world_size")]
        if "batch_size" in hp and all(isinstance(v, int) and v >= 1 for v in per_step):
            meta["samples_seen"] = meta["step"] * per_step[0] * per_step[1] * per_step[2]
    log = train_log(run_dir).get(epoch) if epoch is not None else None
    if log:
        if "last" in log:
            meta["loss"] = {"last": log["last"], "avg": log["avg"], "window": log["window"]}
        if "wall_time" in log:
            meta["wall_time"] = log["wall_time"]
    metrics = dict(epoch_metrics(run_dir).get(epoch, {})) if epoch is not None else {}
    if "num_samples" in metrics:  # the size of the validation set, not a metric
        meta["eval_samples"] = int(metrics.pop("num_samples"))
    if metrics:
        meta["metrics"] = metrics
    return meta


LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
MAX_CONFIG_BYTES = 256 * 1024  # a model config is a few kB; anything larger is not one


def trainer_dirs(run_dir: Path, hp: Mapping[str, Any]) -> list[Path]:
    """Where ``open_clip_train`` may have been started for the run in ``run_dir`` (``logs/NAME``), most likely
    first: the folder its relative ``log_path``/``checkpoint_path``/``logs`` (params.txt) resolve from, then the
    run dir's own ancestors (a launcher that started it a few levels up), then the current folder."""
    out: list[Path] = []
    name = hp.get("name") if isinstance(hp.get("name"), str) else run_dir.name
    for key, below in (("log_path", run_dir / "out.log"), ("checkpoint_path", run_dir / "checkpoints"),
                       ("logs", run_dir)):  # fmt: skip
        rel = hp.get(key)
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
            continue
        parts = Path(os.path.normpath(rel)).parts + ((name,) if key == "logs" else ())
        if ".." in parts or len(parts) > len(below.parts) or below.parts[-len(parts) :] != parts:
            continue
        out.append(Path(*below.parts[: -len(parts)]))
    out += list(run_dir.parents)[:4]
    out.append(Path.cwd())
    return list(dict.fromkeys(out))


def local_dir_config(model: str, run_dir: Path, hp: Mapping[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """The content of ``open_clip_config.json`` for a ``--model local-dir:DIR`` run, and the file it came from;
    ``None`` for another model name or when no candidate folder (:func:`trainer_dirs`) holds a readable config.
    A relative ``DIR`` is resolved against the folder the trainer ran in, not against where ingest runs."""
    if not model.startswith(LOCAL_DIR) or not model[len(LOCAL_DIR) :]:
        return None
    target = Path(model[len(LOCAL_DIR) :]).expanduser()
    bases = [Path("/")] if target.is_absolute() else trainer_dirs(run_dir, hp)
    for base in bases:
        f = base / target / CONFIG_FILE
        try:
            if not f.is_file() or f.stat().st_size > MAX_CONFIG_BYTES:
                continue
            cfg = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        inner = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
        if isinstance(inner, dict) and "vision_cfg" in inner and "text_cfg" in inner:
            return cfg, f.resolve()
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def step_of(ckpt: Mapping[str, Any]) -> int:
    """Newer open_clip_train records ``global_step``; older ones only ``epoch``."""
    if isinstance(ckpt.get("global_step"), int):
        return int(ckpt["global_step"])
    if isinstance(ckpt.get("epoch"), int):
        return int(ckpt["epoch"])
    raise ForeignCheckpointError(
        "checkpoint has neither 'global_step' nor 'epoch'",
        hint="open_clip_train checkpoints record at least 'epoch'; is this file one of them?",
    )


def ingest(
    store: Store,
    paths: list[str | Path],
    *,
    run: str | None = None,
    skip_existing: bool = True,
    on_file: Callable[[Path, CheckpointInfo | None], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[CheckpointInfo]:
    """Store each ``epoch_N.pt`` (files, run folders or ``checkpoints/`` folders) in epoch order."""
    files: list[Path] = []
    for p in paths:
        files.extend(epoch_files(p))
    if not files:
        raise ForeignCheckpointError("no epoch_N.pt files found", path=", ".join(map(str, paths)))
    out = []
    for f in files:
        run_name = run or default_run_name(f)
        ckpt = read_checkpoint(f)
        try:
            step = step_of(ckpt)
        except CkptStoreError as exc:
            exc.path = str(f)
            raise
        if step in store.steps(run_name):
            if not skip_existing:
                raise CheckpointExistsError(f"{run_name}@{step} already stored", path=str(f))
            if on_file is not None:
                on_file(f, None)
            continue
        try:
            info = store.save(run_name, step, ckpt, checkpoint_metadata(ckpt, f), progress=progress)
        except CkptStoreError as exc:
            if exc.path is None:  # name the file the problem came from
                exc.path = str(f)
            raise
        out.append(info)
        if on_file is not None:
            on_file(f, info)
        del ckpt
    return out


def dropped_note(dropped: list[str]) -> str:
    """What a checkpoint without ``dropped`` parts is good for, in words (export and release say it)."""
    if "optimizer" in dropped:
        return ("weights only: its optimizer state was dropped (`ckpt thin --keep-weights`). The .pt has no "
                "`optimizer` key: open_clip.create_model_and_transforms(..., pretrained=FILE) loads it, "
                "`open_clip_train --resume` cannot (it stops with KeyError: 'optimizer'); resume from a "
                "complete checkpoint (`ckpt ls` shows which)")  # fmt: skip
    if "lossless" in dropped:
        return (
            "LOSSY (ckpt archive): every tensor within its recorded error bound, not the original bits "
            "(docs/archive.md)"
        )
    return f"missing {', '.join(dropped)}"


def export_pt(store: Store, ref: str, out: str | Path) -> Path:
    """Write the stored checkpoint back as an open_clip_train ``.pt`` (same keys, bit-identical tensors; a
    weights-only checkpoint without ``optimizer``, :func:`dropped_note`)."""
    import torch

    state = store.load(ref, tensors="torch")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        torch.save(state, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no .partial behind
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_safetensors(store: Store, ref: str, out: str | Path, *, key: str = "state_dict") -> Path:
    """Write the model weights (``state_dict``, or the whole flat state) as a safetensors file."""
    from safetensors.torch import save_file

    m = store.resolve(ref)
    prefix = f"{key}/"
    names = [n for n in m.full_tensors if n.startswith(prefix)] or list(m.full_tensors)
    tensors = {}
    from ckptstore.torch import leaf_to_tensor

    for n, leaf in store.load_leaves(m, names).items():
        tensors[n[len(prefix) :] if n.startswith(prefix) else n] = leaf_to_tensor(leaf)
    meta = {"ckptstore_ref": m.ref}
    if "epoch" in m.metadata:
        meta["epoch"] = str(m.metadata["epoch"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; follow the umask like torch.save
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
