"""Real OpenCLIP training trajectories on CPU, written by the unmodified ``open_clip_train`` script.

The demo, the tests and the benchmarks need checkpoints that are the real thing: the trainer's own
``epoch_N.pt`` files (``epoch``/``name``/``state_dict``/``optimizer``) from its own loop, with AdamW state,
weight decay, a cosine schedule and a token table whose rows are touched by tens of thousands of distinct
tokens. Hand-made tensors would flatter a delta codec, so this module trains a tiny CLIP on scikit-learn's
bundled digits (no download) by launching ``open_clip_train.main`` in a subprocess, and caches finished runs
keyed by every parameter.

torch, open_clip and scikit-learn are imported inside the functions so ``import ckptstore.demo`` stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ckptstore.errors import CkptStoreError, MissingDependencyError
from ckptstore.util import pid_alive

__all__ = [
    "CONTEXT_LENGTH",
    "MODEL_NAMES",
    "SIZES",
    "TrainingRunError",
    "TrajectoryConfigError",
    "build_model",
    "caption_vocabulary",
    "default_cache_root",
    "ensure_trajectory",
    "gradient_coverage",
    "main",
    "model_name",
    "run_open_clip_train",
    "tiny_model_config",
    "write_digits_dataset",
    "write_model_configs",
]

DatasetKind = Literal["csv", "synthetic"]

#: Text context of the demo models: captions are short, and a short context keeps the text tower cheap.
CONTEXT_LENGTH = 32
VOCAB_SIZE = 49408
#: Model names registered (inside the training process) for each size.
MODEL_NAMES: dict[str, str] = {"tiny": "ckpt-tiny-ViT", "small": "ckpt-small-ViT"}
SIZES = tuple(MODEL_NAMES)

# (vision width, vision layers, patch, text width, text layers, text heads, embed dim)
_ARCH: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "tiny": (192, 3, 8, 128, 3, 4, 128),
    "small": (256, 4, 8, 192, 4, 3, 192),
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = (
    "a photo of the digit {name}",
    "handwritten {num}",
    "a handwritten {name}",
    "the number {name}",
    "a blurry scan of a {num}",
    "digit {name} written by hand",
    "a small picture of the number {num}",
    "an image of a {name}",
)
#: Range of random vocabulary words appended to each caption: the top end overflows the context on purpose,
#: so that every text position (and so every row of the text positional embedding) gets gradient.
WORDS_PER_CAPTION = (4, 28)
CSV_SEPARATOR = "\t"
CACHE_ENV = "CKPTSTORE_TRAJECTORY_CACHE"
_CACHE_VERSION = 1  # bump when the dataset, captions or run layout change: it is part of the cache key
_DIST_ENV_VARS = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
    "SLURM_LOCALID", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
)  # fmt: skip


class TrajectoryConfigError(CkptStoreError, ValueError):
    """A demo trajectory was asked for with parameters that cannot work."""


class TrainingRunError(CkptStoreError, RuntimeError):
    """The ``open_clip_train`` subprocess failed or did not leave the expected checkpoints."""


def _need(*modules: str) -> None:
    """Fail with one clear message, not an ImportError deep in a subprocess, when an extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"the demo trajectory needs {', '.join(missing)}",
            hint="pip install 'ckptstore[openclip]' scikit-learn pandas",
        )


def _check_size(size: str) -> str:
    if size not in MODEL_NAMES:
        raise TrajectoryConfigError(f"unknown model size {size!r}", hint=f"use one of {', '.join(SIZES)}")
    return size


# ----------------------------------------------------------------------------------------------- models


def tiny_model_config(size: str = "tiny") -> dict[str, Any]:
    """The open_clip model config (``embed_dim``/``vision_cfg``/``text_cfg``) of a demo size.

    "tiny" (~8.3 M parameters, 6.3 M of them the 49408 x 128 token table) is for tests, ~9 s an epoch on 2
    cores; "small" (~14.6 M, 9.5 M of them token table) is the benchmark's model, ~20 s an epoch.
    """
    vw, vl, ps, tw, tl, th, ed = _ARCH[_check_size(size)]
    return {
        "embed_dim": ed,
        "vision_cfg": {"image_size": 32, "patch_size": ps, "width": vw, "layers": vl, "head_width": 64},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": tw, "heads": th,
                     "layers": tl},
    }  # fmt: skip


def model_name(size: str) -> str:
    """The registry name the trainer is given for a demo size."""
    return MODEL_NAMES[_check_size(size)]


def write_model_configs(config_dir: Path) -> Path:
    """Write one ``<model name>.json`` per size, the layout ``open_clip.add_model_config`` scans."""
    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    for size, name in MODEL_NAMES.items():
        (config_dir / f"{name}.json").write_text(json.dumps(tiny_model_config(size), indent=2) + "\n")
    return config_dir


def build_model(size: str = "tiny") -> Any:
    """An untrained ``open_clip.CLIP`` of a demo size, in this process; ``state_dict`` keys match a run's."""
    _need("torch", "open_clip")
    import open_clip

    return open_clip.CLIP(**tiny_model_config(size))


# ---------------------------------------------------------------------------------------------- dataset


def caption_vocabulary() -> list[str]:
    """Plain alphabetic words of the CLIP BPE vocabulary, each one token: filler that touches many table rows.

    Read straight from open_clip's merges file (what ``SimpleTokenizer`` builds its encoder from) so that
    writing a dataset does not pay for importing torch.
    """
    _need("open_clip")
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    bpe = Path(locations[0]) / "bpe_simple_vocab_16e6.txt.gz" if locations else None
    tokens: set[str]
    if bpe is not None and bpe.is_file():
        merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        tokens = {"".join(m.split()) for m in merges} | {c + "</w>" for c in string.ascii_lowercase}
    else:  # a packaging change moved the file: ask the tokenizer itself
        from open_clip.tokenizer import SimpleTokenizer

        tokens = set(SimpleTokenizer(context_length=CONTEXT_LENGTH).encoder)
    words = {t[:-4] for t in tokens if t.endswith("</w>")}
    return sorted(w for w in words if w.isascii() and w.isalpha() and w not in DIGIT_NAMES)


def digit_captions(labels: Sequence[int], seed: int, words_per_caption: tuple[int, int]) -> list[str]:
    """Digit phrase first (it survives truncation), then vocabulary words dealt without replacement.

    Dealing from a shuffled deck, rather than sampling, makes the number of distinct tokens as large as the
    number of word slots allows, which is what puts gradient on many rows of the token table.
    """
    rng = random.Random(seed)
    deck = caption_vocabulary()
    rng.shuffle(deck)
    pos = 0
    lo, hi = words_per_caption
    out = []
    for label in labels:
        phrase = rng.choice(_TEMPLATES).format(name=DIGIT_NAMES[label], num=label)
        words = []
        for _ in range(rng.randint(lo, hi)):
            if pos == len(deck):
                rng.shuffle(deck)
                pos = 0
            words.append(deck[pos])
            pos += 1
        out.append(" ".join([phrase, *words]))
    return out


def write_digits_dataset(
    out_dir: Path,
    *,
    image_size: int = 32,
    seed: int = 0,
    n_images: int | None = None,
    words_per_caption: tuple[int, int] = WORDS_PER_CAPTION,
    paths_relative_to: Path | None = None,
) -> Path:
    """Write scikit-learn's 1797 8x8 digits as RGB PNGs plus a tab-separated ``filepath``/``title`` CSV.

    The CSV is what ``open_clip_train --dataset-type csv`` reads with its default separator and keys. Image
    paths are absolute unless ``paths_relative_to`` names the directory the trainer will run in (which keeps a
    dataset built in a temporary directory valid after it is renamed into a cache). Returns the CSV path.
    """
    _need("sklearn", "PIL", "numpy", "open_clip")
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.images) if n_images is None else n_images
    if not 0 < count <= len(digits.images):
        raise TrajectoryConfigError(f"n_images must be in 1..{len(digits.images)}, got {n_images}")
    out_dir = Path(out_dir).resolve()
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    labels = [int(t) for t in digits.target[:count]]
    captions = digit_captions(labels, seed, words_per_caption)
    rows = []
    for i in range(count):
        pixels = (np.asarray(digits.images[i]) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        path = img_dir / f"{i:05d}.png"
        img.convert("RGB").save(path)
        shown = os.path.relpath(path, paths_relative_to) if paths_relative_to is not None else str(path)
        if any(c in shown or c in captions[i] for c in (CSV_SEPARATOR, "\n", '"')):
            raise TrajectoryConfigError(f"dataset path or caption holds a separator or quote: {shown!r}")
        rows.append(f"{shown}{CSV_SEPARATOR}{captions[i]}\n")
    csv_path = out_dir / "digits.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    tmp.write_text(f"filepath{CSV_SEPARATOR}title\n" + "".join(rows))
    os.replace(tmp, csv_path)
    return csv_path


# --------------------------------------------------------------------------------------------- training


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _child_env(env: Mapping[str, str] | None, device: str, threads: int | None) -> dict[str, str]:
    """The trainer's environment: one process, bounded threads, ckptstore importable, CUDA hidden for CPU."""
    child = {k: v for k, v in os.environ.items() if k not in _DIST_ENV_VARS}
    # Oversubscribed OpenMP threads (e.g. a container that sees the host's cores) slow small models a lot;
    # an explicit ``threads`` wins over the caller's environment, which wins over the usable core count.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if threads is not None:
            child[var] = str(threads)
        else:
            child.setdefault(var, str(_cpu_count()))
    if device == "cpu":
        child["CUDA_VISIBLE_DEVICES"] = ""
    pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding the ckptstore package
    child["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, child.get("PYTHONPATH", "")) if p)
    child.update(env or {})
    return child


def default_warmup(epochs: int, steps_per_epoch: int) -> int:
    """About a tenth of training: the trainer's default of 10000 steps would never leave warmup here."""
    return max(1, (epochs * steps_per_epoch) // 10)


def run_open_clip_train(
    workdir: Path,
    *,
    epochs: int,
    size: str = "tiny",
    batch_size: int = 64,
    lr: float = 5e-4,
    warmup: int | None = None,
    seed: int = 0,
    dataset: DatasetKind = "csv",
    train_csv: Path | None = None,
    n_images: int | None = None,
    val_samples: int = 512,
    name: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[subprocess.Popen[bytes] | subprocess.CompletedProcess[bytes], Path]:
    """Run the unmodified ``open_clip_train.main`` on a demo model in a subprocess; return it and its run dir.

    Everything lives under ``workdir`` and the trainer runs with ``workdir`` as its current directory, given
    relative paths, so the folder can be moved (or renamed into a cache) afterwards: ``model_configs/``,
    ``data/`` (the digits, unless ``train_csv`` is given), ``console.log`` (the trainer's stdout and stderr)
    and ``logs/<name>/``, the run dir: ``out.log``, ``params.txt``, ``checkpoints/epoch_N.pt`` and, unless
    ``val_samples`` is 0, ``checkpoints/results.jsonl`` from evaluating the first ``val_samples`` training
    rows after every epoch. ``env`` entries override the environment. With ``wait`` the call blocks and raises
    :class:`TrainingRunError` on failure; without it the running ``Popen`` is returned.
    """
    _need("torch", "open_clip", "open_clip_train", "pandas")
    _check_size(size)
    if epochs < 1:
        raise TrajectoryConfigError(f"epochs must be >= 1, got {epochs}")
    if dataset not in ("csv", "synthetic"):
        raise TrajectoryConfigError(f"unknown dataset {dataset!r}", hint="use 'csv' or 'synthetic'")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    name = name or f"{size}-{dataset}-e{epochs}-s{seed}"
    run_dir = workdir / "logs" / name
    if (run_dir / "out.log").exists():
        raise TrainingRunError("a run with this name already exists", path=str(run_dir),
                               hint="pass another name or workdir")  # fmt: skip
    write_model_configs(workdir / "model_configs")

    n_samples = 1797 if n_images is None else n_images
    data_args: list[str]
    if dataset == "csv":
        if train_csv is None:
            train_csv = _ensure_dataset(workdir, seed=seed, n_images=n_images)
        else:
            with Path(train_csv).open() as f:
                n_samples = sum(1 for _ in f) - 1
        csv_arg = os.path.relpath(Path(train_csv).resolve(), workdir)
        data_args = ["--dataset-type", "csv", "--train-data", csv_arg, "--csv-separator", CSV_SEPARATOR,
                     "--csv-img-key", "filepath", "--csv-caption-key", "title"]  # fmt: skip
        if val_samples > 0:  # training rows, not held out: the point is results.jsonl for metadata ingest
            val_arg = os.path.relpath(_head_csv(Path(train_csv), val_samples).resolve(), workdir)
            data_args += ["--val-data", val_arg, "--val-frequency", "1"]
    else:  # a constant black image and a constant caption: plumbing only
        data_args = ["--dataset-type", "synthetic", "--train-num-samples", str(n_samples)]
    steps_per_epoch = n_samples // batch_size  # the train loader drops the last partial batch
    if steps_per_epoch < 1:
        raise TrajectoryConfigError(f"{n_samples} samples give no full batch of {batch_size}")
    if warmup is None:
        warmup = default_warmup(epochs, steps_per_epoch)

    cmd = [
        sys.executable, "-m", "ckptstore.demo._train_entry", "--model-config-dir", "model_configs",
        "--model", model_name(size), "--name", name, "--logs", "logs", *data_args,
        "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", str(lr), "--wd", "0.1",
        "--warmup", str(warmup), "--workers", "0", "--precision", "fp32", "--device", device,
        "--seed", str(seed), "--save-frequency", "1", "--report-to", "", "--log-every-n-steps", "10",
        *extra_args,
    ]  # fmt: skip
    child_env = _child_env(env, device, threads)
    console = workdir / "console.log"
    with console.open("ab") as log:  # the child keeps its own descriptor; ours can close at once
        proc = subprocess.Popen(cmd, cwd=workdir, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    if not wait:
        return proc, run_dir
    try:
        rc = proc.wait() if progress is None else _follow(proc, console, epochs, progress)
    except BaseException:  # don't leave a trainer running behind an interrupted caller
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        tail = console.read_text(errors="replace")[-3000:]
        raise TrainingRunError(f"open_clip_train exited with status {rc}:\n{tail}", path=str(console))
    last = run_dir / "checkpoints" / f"epoch_{epochs}.pt"
    if not last.is_file():
        raise TrainingRunError("open_clip_train exited 0 without its last checkpoint", path=str(last))
    return subprocess.CompletedProcess(cmd, rc), run_dir


HEARTBEAT = 10.0  # seconds: the longest the demo's training stays silent
_TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \((\d+)%\)\].*?Loss: ([0-9.]+) \(([0-9.]+)\)")


def _follow(proc: subprocess.Popen[bytes], console: Path, epochs: int, progress: Callable[[str], None]) -> int:
    """Wait for the trainer, turning its log (open_clip_train's ``Train Epoch: E [N/M (P%)] ... Loss: L (AVG)``
    lines) into progress lines with an ETA."""
    start = time.monotonic()
    last_line = start
    done_fraction = 0.0
    offset = console.stat().st_size if console.exists() else 0
    while True:
        rc = proc.poll()
        with contextlib.suppress(OSError), console.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            offset += cut
            for line in chunk[:cut].decode(errors="replace").splitlines():
                m = _TRAIN_LINE.search(line)
                if m is None:
                    continue
                epoch, n, total, _pct, _loss, avg = m.groups()
                done_fraction = (int(epoch) + int(n) / max(1, int(total))) / epochs
                elapsed = time.monotonic() - start
                left = elapsed * (1 - done_fraction) / done_fraction if done_fraction > 0 else None
                eta = f", about {left:.0f} s left" if left is not None and done_fraction < 1 else ""
                progress(f"epoch {int(epoch) + 1}/{epochs}: {n}/{total} samples, loss {float(avg):.4f} "
                         f"(epoch mean so far); {elapsed:.0f} s{eta}")  # fmt: skip
                last_line = time.monotonic()
        if rc is not None:
            return rc
        if time.monotonic() - last_line >= HEARTBEAT:
            last_line = time.monotonic()
            progress(f"training ... {last_line - start:.0f} s" + (f" ({done_fraction:.0%} done)" if done_fraction
                     else " (starting: building the model, reading the data)"))  # fmt: skip
        time.sleep(0.5)


def _head_csv(csv_path: Path, rows: int) -> Path:
    """A sibling CSV with the header and the first ``rows`` rows: evaluation on all 1797 would cost a third of
    an epoch each time."""
    out = csv_path.with_name(f"{csv_path.stem}-head{rows}.csv")
    with csv_path.open() as f:
        lines = [line for _, line in zip(range(rows + 1), f, strict=False)]
    out.write_text("".join(lines))
    return out


def _ensure_dataset(workdir: Path, *, seed: int, n_images: int | None) -> Path:
    """The digits CSV under ``workdir/data``, rewritten only when its parameters changed."""
    data_dir = workdir / "data"
    stamp = data_dir / "dataset.json"
    params = {"seed": seed, "n_images": n_images, "image_size": 32, "words": list(WORDS_PER_CAPTION)}
    csv_path = data_dir / "digits.csv"
    if csv_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return csv_path
    csv_path = write_digits_dataset(data_dir, seed=seed, n_images=n_images, paths_relative_to=workdir)
    stamp.write_text(json.dumps(params) + "\n")
    return csv_path


# ------------------------------------------------------------------------------------------------ cache


def default_cache_root() -> Path:
    """``$CKPTSTORE_TRAJECTORY_CACHE``, else ``~/.cache/ckptstore/trajectories``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ckptstore" / "trajectories"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def ensure_trajectory(
    cache_root: Path | None = None,
    *,
    epochs: int,
    size: str = "tiny",
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 5e-4,
    warmup: int | None = None,
    dataset: DatasetKind = "csv",
    n_images: int | None = None,
    val_samples: int = 512,
    extra_args: Sequence[str] = (),
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the checkpoints dir of a finished demo run, training it first unless the cache already holds it.

    The cache key covers every parameter plus the torch/open_clip versions and this module's layout version. A
    run is built in a temporary sibling directory and renamed into place, so a killed build never leaves a
    half-written cache entry (its leftovers are removed by the next call for the same key). Builds of one key
    are serialised by a lock file (``.locks/KEY`` under the cache root): a second process asking for a run that
    is being trained waits for it and reuses the entry.
    """
    _check_size(size)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    params: dict[str, Any] = {
        "epochs": epochs, "size": size, "seed": seed, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "dataset": dataset, "n_images": n_images, "val_samples": val_samples, "extra_args": list(extra_args),
        "model_config": tiny_model_config(size), "words_per_caption": list(WORDS_PER_CAPTION),
        "torch": _version("torch"), "open_clip_torch": _version("open_clip_torch"), "layout": _CACHE_VERSION,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    key = f"{size}-{dataset}-e{epochs}-s{seed}-{digest}"
    name = f"{size}-{dataset}-e{epochs}-s{seed}"
    final = root / key
    ckpt_dir = final / "logs" / name / "checkpoints"

    def finished() -> bool:
        return (final / "trajectory.json").is_file() and (ckpt_dir / f"epoch_{epochs}.pt").is_file()

    if not rebuild and finished():
        if progress is not None:
            progress(f"cached: trained by an earlier run, reused from {final}")
        return ckpt_dir
    root.mkdir(parents=True, exist_ok=True)
    # One build per key at a time (two test workers, or two demos, asking for the same run): the second waits for
    # the first and then reuses its entry instead of training the same run again beside it.
    with _build_lock(root / ".locks" / key, progress):
        if not rebuild and finished():
            if progress is not None:
                progress(f"cached: trained by another process while this one waited, reused from {final}")
            return ckpt_dir
        _build(root, key, name, final, params, epochs=epochs, size=size, batch_size=batch_size, lr=lr,
               warmup=warmup, seed=seed, dataset=dataset, n_images=n_images, val_samples=val_samples,
               extra_args=extra_args, progress=progress)  # fmt: skip
    return ckpt_dir


@contextlib.contextmanager
def _build_lock(path: Path, progress: Callable[[str], None] | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing, never removed: removing a lock file races with a
    process that is opening it), released when the block ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress is not None:
                progress("waiting: another process is training the same run")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(
    root: Path, key: str, name: str, final: Path, params: dict[str, Any], *, epochs: int, size: str, batch_size: int,
    lr: float, warmup: int | None, seed: int, dataset: DatasetKind, n_images: int | None, val_samples: int,
    extra_args: Sequence[str], progress: Callable[[str], None] | None,
) -> None:  # fmt: skip
    """Train the run of cache entry ``key`` in a temporary sibling of ``final`` and rename it into place."""
    if progress is not None:
        progress(f"not cached yet: training now (kept in {root} for later runs)")
    if final.exists():  # asked to rebuild, or someone deleted files from the entry
        shutil.rmtree(final)
    for stale in root.glob(f".tmp-{key}-*"):  # leftovers of builds whose process is gone
        with contextlib.suppress(ValueError, IndexError):
            if not pid_alive(int(stale.name[len(f".tmp-{key}-") :].split("-")[0])):
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))
    try:
        start = time.perf_counter()
        run_open_clip_train(tmp, epochs=epochs, size=size, batch_size=batch_size, lr=lr, warmup=warmup,
                            seed=seed, dataset=dataset, n_images=n_images, val_samples=val_samples, name=name,
                            extra_args=extra_args, progress=progress)  # fmt: skip
        wall = time.perf_counter() - start
        manifest = {**params, "name": name, "wall_seconds": round(wall, 2),
                    "checkpoints": os.path.relpath(tmp / "logs" / name / "checkpoints", tmp)}  # fmt: skip
        (tmp / "trajectory.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same key first (or a rebuild raced): use theirs
            if not (final / "trajectory.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- checks


def gradient_coverage(first: Path, last: Path) -> dict[str, Any]:
    """How much of a trajectory actually trained: elementwise change between two checkpoints and AdamW state.

    ``changed_fraction`` counts state_dict elements that differ; ``exp_avg_zero_fraction`` counts exactly-zero
    first moments in ``last`` (rows of the token table whose token never appeared keep a zero moment, and only
    weight decay moves them); ``tensors_without_gradient`` counts parameters whose whole ``exp_avg`` is zero.
    """
    _need("torch")
    import torch

    a = torch.load(first, map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    total = changed = 0
    unchanged_tensors = []
    for k, ta in a["state_dict"].items():
        diff = int((ta != b["state_dict"][k]).sum())
        total += ta.numel()
        changed += diff
        if diff == 0:
            unchanged_tensors.append(k)
    m_total = m_zero = 0
    no_grad = 0
    table_rows = table_zero_rows = 0
    for st in b["optimizer"]["state"].values():
        m = st["exp_avg"]
        zeros = int((m == 0).sum())
        m_total += m.numel()
        m_zero += zeros
        no_grad += int(zeros == m.numel())
        if m.ndim == 2 and m.shape[0] == VOCAB_SIZE:
            table_rows = m.shape[0]
            table_zero_rows = int((m == 0).all(dim=1).sum())
    return {
        "params": total,
        "changed_fraction": changed / total,
        "unchanged_tensors": unchanged_tensors,
        "exp_avg_zero_fraction": m_zero / m_total,
        "tensors_without_gradient": no_grad,
        "token_rows_never_seen": f"{table_zero_rows}/{table_rows}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build (or reuse) a demo trajectory and print its checkpoints and their sizes."""
    p = argparse.ArgumentParser(prog="python -m ckptstore.demo.trajectory", description=main.__doc__)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dataset", choices=("csv", "synthetic"), default="csv")
    p.add_argument("--val-samples", type=int, default=512, help="rows evaluated per epoch (0: none)")
    p.add_argument("--out", type=Path, default=None, help=f"cache root (default ${CACHE_ENV}, ~/.cache/...)")
    p.add_argument("--rebuild", action="store_true", help="train again even when the cache holds the run")
    p.add_argument("--stats", action="store_true", help="also print gradient coverage, first vs last epoch")
    args = p.parse_args(argv)
    start = time.perf_counter()
    ckpts = ensure_trajectory(
        args.out, epochs=args.epochs, size=args.size, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        dataset=args.dataset, val_samples=args.val_samples, rebuild=args.rebuild,
    )  # fmt: skip
    print(ckpts)
    files = sorted(ckpts.iterdir(), key=lambda f: (f.suffix != ".pt", len(f.name), f.name))
    for f in files:
        print(f"  {f.name:<16} {f.stat().st_size / 1e6:10.2f} MB")
    print(f"  total            {sum(f.stat().st_size for f in files) / 1e6:10.2f} MB"
          f"  ({time.perf_counter() - start:.1f} s)")  # fmt: skip
    if args.stats:
        for k, v in gradient_coverage(ckpts / "epoch_1.pt", ckpts / f"epoch_{args.epochs}.pt").items():
            print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
