"""Publish chosen checkpoints of a run in the form people load today, with a model card. See docs/release.md.

``release(store, run, out=DIR, select=N | refs=[...], as_store=...)`` writes::

    DIR/
      README.md                   model card: Hugging Face front matter, a table of the checkpoints, the curves
      metrics.png                 metric curves over the whole run, released checkpoints marked
      release.json                machine-readable: every checkpoint, why it was chosen, every file's sha256
      SHA256SUMS                  the same checksums for `sha256sum -c SHA256SUMS`
      epoch-05-step-4000/         one folder per checkpoint, loadable as it is by
        open_clip_config.json       open_clip.create_model_and_transforms("local-dir:DIR/epoch-05-step-4000")
        open_clip_model.safetensors
        epoch_5.pt                (training_state=True) the open_clip_train checkpoint, optimizer included
      store/                      (as_store=True) the compact store of the run: every kept checkpoint

The release is built in a temporary sibling folder and renamed into place, so an interrupted release never
leaves a half-written ``DIR``. Every tensor written is the stored tensor, bit for bit.

Choosing checkpoints (``select=N``) uses the key-checkpoint selection of :mod:`ckptstore.policy` (first, last,
coverage of the weights' path, change points of the metric curves), each with its reason; :func:`evenly_spaced`
(first, last, the rest evenly by step) is the fallback where that package is missing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptstore.errors import (
    CkptStoreError,
    FormatError,
    InvalidReferenceError,
    MissingDependencyError,
    StoreExistsError,
)
from ckptstore.format.manifest import Manifest
from ckptstore.format.pack import check_pack_key
from ckptstore.format.spec import STORE_FILE
from ckptstore.integrations.openclip import LOCAL_DIR, local_dir_config, run_dir_of
from ckptstore.store import Store
from ckptstore.util import human_bytes

RELEASE_FORMAT = "ckptstore.release"
RELEASE_VERSION = 1
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CURVES_FILE = "metrics.png"
#: Preferred headline metrics for the model card's table, in order (all metrics go into release.json).
_HEADLINE = ("val_loss", "clip_val_loss", "loss", "top1", "acc", "image_to_text_R@1", "text_to_image_R@1", "R@1")
_COPY_CHUNK = 8 * 2**20


class ReleaseError(CkptStoreError, ValueError):
    """A release cannot be made as asked (no model config, nothing chosen, output folder in the way ...)."""


@dataclass
class Chosen:
    """A checkpoint picked for release and the reason, in words."""

    manifest: Manifest
    reason: str


@dataclass
class FileRecord:
    path: str  # relative to the release folder, "/"-separated
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class _Row:
    chosen: Chosen
    folder: str
    files: list[FileRecord] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- selection


def evenly_spaced(steps: Sequence[int], n: int) -> list[tuple[int, str]]:
    """The fallback selection: ``n`` steps out of ``steps`` (sorted): the first, the last, and the rest at the
    stored steps nearest to evenly spaced points between them. Returns ``(step, reason)`` in step order."""
    steps = sorted(steps)
    if n <= 0 or not steps:
        return []
    if n >= len(steps):
        return [(s, _position_reason(i, len(steps), "every stored checkpoint")) for i, s in enumerate(steps)]
    if n == 1:
        return [(steps[-1], "last checkpoint")]
    lo, hi = steps[0], steps[-1]
    picked: list[int] = []
    for i in range(n):
        target = lo + (hi - lo) * i / (n - 1)
        free = [s for s in steps if s not in picked]
        picked.append(min(free, key=lambda s: (abs(s - target), s)))
    picked.sort()
    return [(s, _position_reason(i, n, f"evenly spaced by step ({i + 1} of {n})")) for i, s in enumerate(picked)]


def _position_reason(i: int, n: int, middle: str) -> str:
    if i == 0:
        return "first checkpoint"
    if i == n - 1:
        return "last checkpoint"
    return middle


def select_checkpoints(
    store: Store, run: str, n: int, *, metrics: Sequence[str] | None = None
) -> tuple[list[Chosen], str]:
    """``n`` key checkpoints of ``run`` with reasons, and the name of the method that chose them.

    The key-checkpoint selection of :mod:`ckptstore.policy` (``policy.select`` over the run's history with weight
    paths: first, last, coverage of the progress curve, change points of the metric curves; docs/policies.md);
    :func:`evenly_spaced` where that package is not available. ``n = 1`` is the last checkpoint."""
    if n < 1:
        raise ReleaseError(f"--select wants at least 1 checkpoint, got {n}")
    steps = store.steps(run)
    if not steps:
        raise ReleaseError(f"run {run!r} has no checkpoints", path=store.url, hint="`ckpt ls` lists the runs")
    if n == 1:
        return [Chosen(store.manifest(run, steps[-1]), "last checkpoint")], "the last checkpoint"
    try:
        from ckptstore.policy import select
        from ckptstore.policy.thin import history
    except ImportError:  # pragma: no cover - the policy package ships with ckptstore
        picks = evenly_spaced(steps, n)
        return [Chosen(store.manifest(run, s), why) for s, why in picks], "evenly spaced by step"
    # Weight paths cost a decode of every checkpoint's weights; needless when every checkpoint is chosen anyway.
    entries = history(store, run, paths=len(steps) > n)
    choices = select(entries, n, metrics=list(metrics) if metrics else None)
    chosen = [Chosen(store.manifest(run, c.step), c.reason) for c in choices]
    return chosen, "key-checkpoint selection (ckptstore.policy.select: first, last, coverage, change points)"


def resolve_refs(store: Store, run: str, refs: Sequence[str]) -> list[Chosen]:
    """``refs`` as given (``RUN@epoch=5``) or relative to ``run`` (``epoch=5``, ``4000``, ``latest``)."""
    out: dict[int, Chosen] = {}
    for ref in refs:
        full = ref if "@" in ref else f"{run}@{ref}"
        m = store.resolve(full)
        if m.run != run:
            raise InvalidReferenceError(f"{ref!r} names run {m.run!r}, not {run!r}", ref=ref)
        out.setdefault(m.step, Chosen(m, f"requested ({ref})"))
    return [out[s] for s in sorted(out)]


# ------------------------------------------------------------------------------------------ model config


def _open_clip_config(name: str) -> dict[str, Any] | None:
    """open_clip's registry entry for ``name``: ``open_clip.get_model_config(name)``, or, while open_clip is not
    imported yet (so no ``add_model_config`` can have extended the registry), the same entry read from the
    package's ``model_configs/<name>.json`` without importing it (``import open_clip`` costs seconds)."""
    if "open_clip" not in sys.modules and ":" not in name:  # "hf-hub:" and "local-dir:" names need open_clip
        if Path(name).name != name or name in ("", ".."):
            return None  # the registry's names are file names
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "model_configs" / f"{name}.json"
            if path.is_file():
                cfg = json.loads(path.read_text(encoding="utf-8"))
                # open_clip registers a file only with these keys (factory._rescan_model_configs)
                if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                    return cfg
        return None
    try:
        import open_clip
    except ImportError:
        return None
    try:
        cfg = open_clip.get_model_config(name)
    except (OSError, ValueError):  # an hf-hub: name offline, a malformed schema: not a registered model
        return None
    return dict(cfg) if cfg else None


def model_name_of(meta: Mapping[str, Any]) -> str | None:
    """The model name a checkpoint's metadata records: ``model``, else open_clip_train's ``hparams.model``."""
    name = meta.get("model") or (meta.get("hparams") or {}).get("model")
    return str(name) if name else None


def resolve_model_config(
    meta: Mapping[str, Any],
    given: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    ref: str = "this checkpoint",
) -> tuple[dict[str, Any], str]:
    """The open_clip model config (``embed_dim``/``vision_cfg``/``text_cfg``) of a checkpoint, from its metadata
    ``meta`` (a stored manifest's or a ``.pt`` file's; ``ref`` names it in errors), and where it came from.
    In order: ``given`` (a dict or a JSON file, either the bare config or an ``open_clip_config.json``);
    the checkpoint's ``metadata.model_config``; open_clip's registry for the model name in the metadata
    (``model``, or ``hparams.model`` from open_clip_train's params.txt); a ``model_configs/<name>.json`` up to
    four folders above the ingested file (where a training launcher that registers its own configs keeps them)."""
    if given is not None:
        if isinstance(given, Mapping):
            cfg, source = dict(given), "given"
        else:
            try:
                cfg, source = json.loads(Path(given).read_text()), str(given)
            except (OSError, ValueError) as exc:
                raise ReleaseError(
                    f"cannot read the model config {str(given)!r}: {getattr(exc, 'strerror', None) or exc}",
                    path=str(given),
                    hint="--model-config takes a JSON file: an open_clip_config.json or a bare model config",
                ) from None
        return _bare(cfg), source
    stored = meta.get("model_config")
    if isinstance(stored, Mapping):
        return _bare(dict(stored)), "metadata.model_config"
    name = model_name_of(meta)
    src = (meta.get("source") or {}).get("file")
    if name and name.startswith(LOCAL_DIR):
        # Never open_clip's own lookup: it reads the folder relative to *this* process's cwd.
        run_dir = run_dir_of(Path(src)) if isinstance(src, str) else None
        found = local_dir_config(name, run_dir, meta.get("hparams") or {}) if run_dir else None
        if found is not None:
            return _bare(found[0]), str(found[1])
        raise ReleaseError(
            f"no open_clip model config for {ref}: its model {name!r} is a folder relative to where training "
            f"ran, its {CONFIG_FILE} was not captured when the checkpoint was stored and is not found now"
            + (f" (looked beside the run folder {run_dir})" if run_dir else ""),
            ref=ref,
            hint="pass --model-config FILE (that folder's open_clip_config.json), or re-ingest the run while the "
            "training folder still exists so the config is stored with it",
        )
    if name:
        registered = _open_clip_config(name)
        if registered:
            return registered, f"open_clip.get_model_config({name!r})"
        if isinstance(src, str):
            for parent in list(Path(src).parents)[:5]:
                candidate = parent / "model_configs" / f"{name}.json"
                if candidate.is_file():
                    return _bare(json.loads(candidate.read_text())), str(candidate)
    raise ReleaseError(
        f"no open_clip model config for {ref}" + (f" (model {name!r} is not in open_clip's registry)" if name else ""),
        ref=ref,
        hint="pass --model-config FILE: the model's JSON config (embed_dim, vision_cfg, text_cfg)",
    )


def _bare(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = cfg.get("model_cfg", cfg)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ReleaseError("not an open_clip model config (needs vision_cfg and text_cfg)")
    return cfg


def preprocess_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Image normalisation as the run trained with it (params.txt in the metadata), else open_clip's defaults."""
    hp = meta.get("hparams") or {}
    out: dict[str, Any] = {}
    try:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        out = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    except ImportError:  # pragma: no cover - release needs open_clip to be useful anyway
        pass
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        val = hp.get(key)
        if isinstance(val, list | tuple) and all(isinstance(v, int | float) for v in val):
            out[name] = [float(v) for v in val]
    for key, name in (("image_interpolation", "interpolation"), ("image_resize_mode", "resize_mode")):
        if isinstance(hp.get(key), str):
            out[name] = hp[key]
    return out


# --------------------------------------------------------------------------------------------- writing


def folder_name(m: Manifest) -> str:
    """``epoch-05-step-4000``; ``step-4000`` when the checkpoint records no epoch. The step is the training step
    (the metadata's, where the store keys an open_clip checkpoint by its epoch), never the epoch again."""
    epoch = m.metadata.get("epoch")
    step = m.metadata.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        step = m.step
    lossy = "-lossy" if "lossy" in m.data else ""  # the lossy archive tier (docs/archive.md) says so in its name
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        return f"epoch-{epoch:02d}-step-{step}{lossy}"
    return f"step-{step}{lossy}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _record(root: Path, path: Path) -> FileRecord:
    return FileRecord(path.relative_to(root).as_posix(), path.stat().st_size, _sha256(path))


def model_tensor_names(m: Manifest, key: str = "state_dict") -> dict[str, str]:
    """Parameter name (``module.`` stripped) -> stored tensor name, from the checkpoint's state tree."""
    sd = m.data["tree"].get(key) if isinstance(m.data.get("tree"), dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ReleaseError(f"{m.ref} has no {key!r} of tensors", ref=m.ref, hint="is it an OpenCLIP checkpoint?")
    out = {}
    for param, node in sd.items():
        if not (isinstance(node, dict) and set(node) == {"$tensor"}):
            raise ReleaseError(f"{key}[{param!r}] is not a tensor", ref=m.ref)
        out[param.removeprefix("module.")] = node["$tensor"]
    return out


def write_weights(store: Store, m: Manifest, path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise MissingDependencyError(
            "a release needs torch and safetensors", hint="pip install 'ckptstore[torch]'"
        ) from exc

    from ckptstore.torch import leaf_to_tensor

    names = model_tensor_names(m)
    leaves = store.load_leaves(m, list(dict.fromkeys(names.values())))
    tensors = {param: leaf_to_tensor(leaves[t]) for param, t in names.items()}
    # Parameters that share storage (tied weights) would make safetensors refuse; each gets its own copy.
    seen: set[int] = set()
    for param, t in tensors.items():
        if t.data_ptr() in seen and t.numel():
            tensors[param] = t.clone()
        seen.add(t.data_ptr())
    meta = {"format": "pt", "ckptstore_ref": m.ref, "step": str(m.step)}
    if "epoch" in m.metadata:
        meta["epoch"] = str(m.metadata["epoch"])
    save_file(tensors, str(path), metadata=meta)


def write_checkpoint_folder(
    store: Store, chosen: Chosen, root: Path, model_cfg: dict[str, Any], *, training_state: bool
) -> _Row:
    m = chosen.manifest
    row = _Row(chosen, folder_name(m))
    d = root / row.folder
    d.mkdir(parents=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(m.metadata)}
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_weights(store, m, d / WEIGHTS_FILE)
    files = [d / CONFIG_FILE, d / WEIGHTS_FILE]
    if training_state:
        from ckptstore.integrations.openclip import export_pt

        epoch = m.metadata.get("epoch")
        name = f"epoch_{epoch}.pt" if isinstance(epoch, int) else f"step_{m.step}.pt"
        files.append(export_pt(store, m.ref, d / name))
    row.files = [_record(root, f) for f in files]
    return row


def copy_run_store(store: Store, run: str, dest: Path) -> dict[str, Any]:
    """Copy the compact store of ``run`` (its manifests and the packs they reference, nothing else) to a new
    local store at ``dest``. Works from any backend (an S3 store releases to local disk)."""
    from ckptstore.storage.local import LocalStorage

    target = LocalStorage(dest)
    src = store.storage
    target.write(STORE_FILE, src.read(STORE_FILE))
    packs: set[str] = set()
    steps = store.steps(run)
    total = 0
    for s in steps:
        m = store.manifest(run, s)
        for rec in m.objects.values():
            packs.add(rec["pack"])
    for pack in sorted(packs):
        try:
            check_pack_key(pack, store.manifest(run, steps[0]).key)
        except FormatError:
            raise ReleaseError(f"object location {pack!r} outside packs/", ref=run) from None
        size = src.size(pack)
        with target.open_writer(pack) as w:
            for off in range(0, size, _COPY_CHUNK):
                w.write(src.read_range(pack, off, min(_COPY_CHUNK, size - off)))
            w.commit()
        total += size
    for s in steps:  # manifests last: the copy holds a checkpoint only once everything it needs is there
        key = store.manifest(run, s).key
        raw = src.read(key)
        target.write(key, raw)
        total += len(raw)
    copied = Store(target)
    if copied.steps(run) != steps:  # pragma: no cover - a sanity check
        raise ReleaseError("the copied store does not list the same checkpoints", path=str(dest))
    logical = sum(i.logical_bytes for i in copied.checkpoints(run))
    return {"path": dest.name, "run": run, "steps": steps, "bytes": total, "logical_bytes": logical,
            "packs": len(packs)}  # fmt: skip


# ------------------------------------------------------------------------------------------ model card


def headline_metrics(infos: Sequence[Mapping[str, Any]], wanted: Sequence[str] | None, limit: int = 3) -> list[str]:
    names: list[str] = []
    for meta in infos:
        for k, v in (meta.get("metrics") or {}).items():
            if isinstance(v, int | float) and k not in names:
                names.append(k)
    if wanted:
        return [w for w in wanted if w in names]
    ordered = [n for pref in _HEADLINE for n in names if n == pref]
    ordered += [n for pref in _HEADLINE for n in names if pref.lower() in n.lower() and n not in ordered]
    return list(dict.fromkeys(ordered))[:limit] or names[:limit]


def plot_curves(store: Store, run: str, rows: Sequence[_Row], metrics: Sequence[str], path: Path) -> None:
    """Each metric (and the stored size) over every checkpoint of the run, released checkpoints marked."""
    try:
        from matplotlib.figure import Figure  # a private figure on the Agg canvas: the caller's backend stays
    except ImportError as exc:
        raise MissingDependencyError(
            "the release's metric curves need matplotlib", hint="pip install matplotlib"
        ) from exc

    from matplotlib.ticker import MaxNLocator

    infos = store.checkpoints(run)
    panels = [*metrics, "stored size (MB)"]
    released = {r.chosen.manifest.step for r in rows}
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, name in zip(axes.flat, panels, strict=False):
        if name == "stored size (MB)":
            pts = [(i.step, i.stored_bytes / 1e6) for i in infos]
        else:
            pts = [(i.step, float(i.metadata["metrics"][name])) for i in infos
                   if isinstance((i.metadata.get("metrics") or {}).get(name), int | float)]  # fmt: skip
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "-", color="0.45", marker=".", label="stored checkpoints")
            rel = [(x, y) for x, y in pts if x in released]
            if rel:
                rx, ry = zip(*rel, strict=True)
                ax.plot(rx, ry, "o", color="tab:red", label="released")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="best", fontsize="small")
    fig.suptitle(f"{run}: {len(infos)} stored checkpoints, {len(rows)} released")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt_metric(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "–"
    return f"{v:.4g}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _card_checkpoints(info: Mapping[str, Any], rows: Sequence[_Row], metrics: Sequence[str]) -> list[str]:
    lines: list[str] = []
    run = info["run"]
    total = info.get("stored_checkpoints")
    if rows:
        lines += [
            f"{len(rows)} of the {total} stored checkpoints of the training run `{run}`, chosen by "
            f"{info['selection']['method']}. Each folder loads in OpenCLIP as it is; every tensor is bit-identical "
            f"to the checkpoint the training run wrote. Released with ckptstore {info['ckptstore_version']} on "
            f"{info['created'][:10]}.",
            "",
            "## Checkpoints",
            "",
        ]
        lossy = [r.folder for r in rows if "lossy" in r.chosen.manifest.data]
        if lossy:
            lines[0] = lines[0].replace("every tensor is bit-identical to the checkpoint the training run wrote",
                                        "every tensor is bit-identical to the checkpoint the training run wrote, "
                                        "except in the LOSSY folders")  # fmt: skip
            lines += [f"**LOSSY**: {', '.join(f'`{f}`' for f in lossy)} come from the error-bounded archive tier "
                      "(`ckpt archive`, ckptstore docs/archive.md): each tensor is within its recorded bound of "
                      "the original, not the original bits.", ""]  # fmt: skip
        head = ["Folder", "Epoch", "Step", "Samples seen", *metrics, "Why chosen", "Size", "SHA-256 of the weights"]
        lines.append("| " + " | ".join(_md_cell(h) for h in head) + " |")
        lines.append("|" + "|".join(["---", "---:", "---:", "---:", *["---:"] * len(metrics), "---", "---:", "---"])
                     + "|")  # fmt: skip
        for r in rows:
            m = r.chosen.manifest
            weights = next(f for f in r.files if f.path.endswith(WEIGHTS_FILE))
            size = sum(f.bytes for f in r.files)
            samples = m.metadata.get("samples_seen")
            cells = [
                f"[`{r.folder}`]({r.folder}/)",
                m.metadata.get("epoch", "–"),
                m.step,
                f"{samples:,}" if isinstance(samples, int) else "–",
                *[_fmt_metric((m.metadata.get("metrics") or {}).get(k)) for k in metrics],
                r.chosen.reason,
                human_bytes(size),
                f"`{weights.sha256}`",
            ]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        lines.append("")
    return lines


def _card_loading(info: Mapping[str, Any], rows: Sequence[_Row]) -> list[str]:
    lines: list[str] = []
    if rows:
        first = rows[-1].folder
        lines += [
            "## Loading",
            "",
            "```python",
            "import open_clip",
            "",
            f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:./{first}")',
            f'tokenizer = open_clip.get_tokenizer("local-dir:./{first}")',
            "```",
            "",
            f"Each folder holds `{CONFIG_FILE}` (the model config and image preprocessing) and `{WEIGHTS_FILE}` "
            "(the model weights).",
        ]
        if info.get("training_state"):
            lines += [
                "It also holds the `open_clip_train` checkpoint (`epoch_N.pt`: weights, optimizer state, epoch) to "
                "resume training from: `python -m open_clip_train.main --resume FOLDER/epoch_N.pt ...` with the "
                "run's other arguments.",
            ]
        lines.append("")
    return lines


def _card_store(info: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    run = info["run"]
    store = info.get("store")
    if store:
        lines += [
            "## The whole trajectory",
            "",
            f"`{store['path']}/` is the run's compact ckptstore store: all {len(store['steps'])} kept checkpoints, "
            f"{human_bytes(store['logical_bytes'])} of tensors in {human_bytes(store['bytes'])}, "
            "each readable bit-exactly. "
            "Open it read-only:",
            "",
            "```python",
            "import ckptstore",
            "",
            f'store = ckptstore.open_store("{store["path"]}", storage_options={{"read_only": True}})',
            f'state = store.load("{run}@latest")            # the whole open_clip_train checkpoint, torch tensors',
            f'w = store.load_tensor("{run}@first", "state_dict/logit_scale")',
            "```",
            "",
            f"or from the command line: `ckpt ls --store {store['path']} -o read_only=true`, "
            f"`ckpt export {run}@epoch=N --store {store['path']} -o read_only=true --format openclip -O epoch_N.pt`. "
            "`pip install ckptstore` is all it needs.",
            "",
        ]
    return lines


def _card_training(info: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    hp = info.get("hparams") or {}
    keys = ("model", "epochs", "batch_size", "lr", "wd", "warmup", "precision", "seed", "world_size")
    shown = [(k, hp[k]) for k in keys if k in hp]
    if shown:
        lines += ["## Training", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| {k} | {_md_cell(v)} |" for k, v in shown]
        lines.append("")
    return lines


def model_card(info: Mapping[str, Any], rows: Sequence[_Row], metrics: Sequence[str], *, has_curves: bool) -> str:
    run = info["run"]
    model = info.get("model") or "OpenCLIP"
    lines = [
        "---",
        "library_name: open_clip",
        f"license: {info.get('license') or 'other'}",
        "pipeline_tag: zero-shot-image-classification",
        "tags:",
        "- clip",
        "- open_clip",
        "- ckptstore",
        "- intermediate-checkpoints",
        "---",
        "",
        f"# {run}: {len(rows)} checkpoint{'s' if len(rows) != 1 else ''} of {model}",
        "",
    ]
    lines += _card_checkpoints(info, rows, metrics)
    if has_curves:
        lines += [f"![Metric curves of {run}: every stored checkpoint, the released ones in red]({CURVES_FILE})", ""]
    lines += _card_loading(info, rows)
    lines += _card_store(info)
    lines += _card_training(info)
    lines += [
        "## Files",
        "",
        "`release.json` lists every checkpoint (epoch, step, metrics, why chosen) and every file with its size and "
        "SHA-256; `sha256sum -c SHA256SUMS` checks them all.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the release


def _normal_modes(root: Path) -> None:
    """mkdtemp makes a private (0700) folder and safetensors private files; a release is for sharing."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _check_request(
    store: Store,
    run: str,
    out: Path,
    *,
    select: int | None,
    refs: Sequence[str] | None,
    as_store: bool,
    overwrite: bool,
) -> None:
    """Refuse a release that asks for nothing, or both kinds of choice, or would overwrite a folder."""
    if select is not None and refs:
        raise ReleaseError("give either select or refs, not both")
    if select is None and not refs and not as_store:
        raise ReleaseError("nothing to release", hint="choose checkpoints (--select N or --refs ...) or --as-store")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise StoreExistsError("the release folder exists and is not empty", path=str(out), hint="use --force")
    if not store.steps(run):
        raise ReleaseError(f"run {run!r} has no checkpoints", path=store.url, hint="`ckpt ls` lists the runs")


def _choose(
    store: Store, run: str, select: int | None, refs: Sequence[str] | None, metrics: Sequence[str] | None
) -> tuple[list[Chosen], str]:
    """The checkpoints to release and how they were chosen."""
    if refs:
        return resolve_refs(store, run, refs), "request (--refs)"
    if select is not None:
        return select_checkpoints(store, run, select, metrics=metrics)
    return [], "none (store only)"


def _checkpoint_entry(r: _Row) -> dict[str, Any]:
    """One checkpoint's entry in ``release.json``."""
    m = r.chosen.manifest
    return {
        "ref": m.ref,
        "folder": r.folder,
        "step": m.step,
        "epoch": m.metadata.get("epoch"),
        "samples_seen": m.metadata.get("samples_seen"),
        "metrics": m.metadata.get("metrics") or {},
        "reason": r.chosen.reason,
        "created": m.data.get("created"),
        "files": [f.as_dict() for f in r.files],
    }


def _write_top_files(
    tmp: Path, info: dict[str, Any], rows: Sequence[_Row], shown: Sequence[str], *, as_store: bool
) -> None:
    """README.md, release.json and SHA256SUMS at the top of the release folder (``info["files"]`` set here)."""
    (tmp / "README.md").write_text(model_card(info, rows, shown, has_curves=True))
    top = [tmp / "README.md", tmp / CURVES_FILE]
    if as_store:
        top += sorted(p for p in (tmp / "store").rglob("*") if p.is_file())
    info["files"] = [_record(tmp, p).as_dict() for p in top]
    (tmp / "release.json").write_text(json.dumps(info, indent=2) + "\n")
    sums = [f for r in rows for f in r.files] + [FileRecord(**f) for f in info["files"]]
    sums.append(_record(tmp, tmp / "release.json"))
    (tmp / "SHA256SUMS").write_text("".join(f"{f.sha256}  {f.path}\n" for f in sums))


def release(
    store: Store,
    run: str,
    out: str | os.PathLike[str],
    *,
    select: int | None = None,
    refs: Sequence[str] | None = None,
    as_store: bool = False,
    model_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    training_state: bool = False,
    metrics: Sequence[str] | None = None,
    license: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a release of ``run`` to the folder ``out``; return what ``release.json`` says."""
    from ckptstore import __version__

    out = Path(out)
    _check_request(store, run, out, select=select, refs=refs, as_store=as_store, overwrite=overwrite)
    chosen, method = _choose(store, run, select, refs, metrics)
    latest = store.manifest(run, store.steps(run)[-1])
    model_cfg: dict[str, Any] = {}
    cfg_source = ""
    if chosen:  # one run, one model: the config of its last chosen checkpoint serves them all
        model_cfg, cfg_source = resolve_model_config(
            chosen[-1].manifest.metadata, model_config, ref=chosen[-1].manifest.ref
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        rows = []
        for i, c in enumerate(chosen):
            rows.append(write_checkpoint_folder(store, c, tmp, model_cfg, training_state=training_state))
            if progress is not None:
                progress(i + 1, len(chosen))
        infos = [i.metadata for i in store.checkpoints(run)]
        shown = headline_metrics(infos, metrics)
        plot_curves(store, run, rows, shown, tmp / CURVES_FILE)
        info: dict[str, Any] = {
            "format": RELEASE_FORMAT,
            "version": RELEASE_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "ckptstore_version": __version__,
            "source_store": store.url,
            "run": run,
            "model": model_name_of(latest.metadata),
            "model_config_source": cfg_source or None,
            "license": license or "other",
            "stored_checkpoints": len(infos),
            "selection": {"method": method, "requested": select if select is not None else list(refs or [])},
            "training_state": training_state,
            "hparams": latest.metadata.get("hparams") or {},
            "checkpoints": [_checkpoint_entry(r) for r in rows],
            "headline_metrics": shown,
        }
        if as_store:
            info["store"] = copy_run_store(store, run, tmp / "store")
        _write_top_files(tmp, info, rows, shown, as_store=as_store)
        _normal_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
