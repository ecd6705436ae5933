"""Probe sets: the images (and texts) the representation and transfer analyses show every checkpoint.

A :class:`ProbeSet` is a small, fixed collection of images with integer labels and class names (for zero-shot
classification and linear probes) and/or one caption per image (for retrieval). Two sources are built in:

* :func:`digits_probe` — scikit-learn's bundled 8x8 digits (no download), upscaled to RGB exactly as the demo
  trajectory's training data is (:func:`ckptstore.demo.trajectory.write_digits_dataset`), with captions written by
  the demo's own caption generator.
* :func:`folder_probe` — your own images, listed in a CSV file (format below).

Probe CSV format
----------------
One header row, then one row per image; tab- or comma-separated (the separator is read from the header line, or
given). Columns, by header name:

``image`` (or ``filepath``, ``path``, ``file``)
    the image file; a relative path is resolved against the CSV file's folder. Any format PIL reads; converted to RGB.
``label`` (optional)
    the class: a class name, or an integer index into the class names. The class names are ``class_names`` if
    given; else "0".."max" when every label is an integer; else the distinct labels, sorted.
``caption`` (or ``title``, ``text``; optional)
    the image's caption, for image/text retrieval.

At least one of ``label`` and ``caption`` is required. open_clip_train's own CSV files (tab-separated, ``filepath``
and ``title`` columns) are valid probe files as they are.

PIL, numpy and scikit-learn are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptstore.errors import CkptStoreError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_TEMPLATES",
    "DIGIT_TEMPLATES",
    "ProbeError",
    "ProbeSet",
    "chance_accuracy",
    "digits_probe",
    "folder_probe",
    "load_probe",
]

#: Prompt templates for zero-shot classification of a generic probe (``{}`` is the class name).
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
#: Prompt templates for the digits probe, in the style of the demo run's captions (``{}`` is "zero".."nine").
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "digit {} written by hand",
    "an image of a {}",
)
DIGIT_CLASSES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_IMAGE_COLUMNS = ("image", "filepath", "path", "file")
_LABEL_COLUMNS = ("label",)
_CAPTION_COLUMNS = ("caption", "title", "text")


class ProbeError(CkptStoreError, ValueError):
    """A probe set cannot be built or used as asked (unreadable CSV row, missing image, no labels for zero-shot)."""


@dataclass(frozen=True, eq=False)  # arrays and images: identity, not element-wise, equality
class ProbeSet:
    """Images with optional integer labels (indices into ``class_names``) and optional captions, one per image.

    ``images`` are PIL images or ``uint8`` arrays (``H x W`` grey or ``H x W x 3`` RGB); :meth:`image` gives each as
    an RGB PIL image. ``templates`` turn a class name into prompts for zero-shot classification (``"{}"`` is
    replaced by the name; the class embedding is the normalised mean of the prompts' normalised embeddings).
    """

    name: str
    images: Sequence[Any]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    captions: tuple[str, ...] | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    #: Where each image came from (file paths, dataset indices): for error messages and provenance.
    sources: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise ProbeError(f"probe {self.name!r} holds no images")
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ProbeError(f"probe {self.name!r}: labels must be {n} integers, got shape {labels.shape}")
            if not self.class_names:
                raise ProbeError(f"probe {self.name!r}: labels need class_names")
            if labels.min() < 0 or labels.max() >= len(self.class_names):
                raise ProbeError(f"probe {self.name!r}: a label is outside 0..{len(self.class_names) - 1}")
            object.__setattr__(self, "labels", labels.astype(np.int64))
        if self.captions is not None and len(self.captions) != n:
            raise ProbeError(f"probe {self.name!r}: {n} images but {len(self.captions)} captions")
        if self.labels is None and self.captions is None:
            raise ProbeError(f"probe {self.name!r} has neither labels nor captions")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ProbeError(f"probe {self.name!r}: every prompt template needs a '{{}}' for the class name")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image."""
        from PIL import Image

        img = self.images[i]
        if isinstance(img, Image.Image):
            return img if img.mode == "RGB" else img.convert("RGB")
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
            raise ProbeError(f"probe {self.name!r}: image {i} is not a uint8 HxW or HxWx3 array")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return Image.fromarray(arr).convert("RGB")

    def prompts(self) -> list[str]:
        """Every class name in every template, class-major (the texts a zero-shot classifier embeds)."""
        return [t.format(c) for c in self.class_names for t in self.templates]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ProbeSet:
        """The probe restricted to ``indices`` (same classes and templates)."""
        idx = [int(i) for i in indices]
        return ProbeSet(
            name=self.name,
            images=[self.images[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=self.class_names,
            captions=None if self.captions is None else tuple(self.captions[i] for i in idx),
            templates=self.templates,
            sources=tuple(self.sources[i] for i in idx) if self.sources else (),
        )

    def describe(self) -> dict[str, Any]:
        """The ``probe`` record of an analysis: name, sizes, classes."""
        return {
            "name": self.name,
            "n_images": len(self),
            "n_texts": len(self.captions) if self.captions is not None else 0,
            "classes": list(self.class_names),
        }


# ------------------------------------------------------------------------------------------------- digits


def _balanced_choice(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with the classes as equally represented as possible, chosen at random, in index order."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    picked: list[int] = []
    while len(picked) < n:
        for c in rng.permutation(classes):
            if pools[int(c)] and len(picked) < n:
                picked.append(int(pools[int(c)].pop()))
    return np.sort(np.asarray(picked, dtype=np.int64))


def digits_probe(
    n: int = 200,
    *,
    seed: int = 0,
    image_size: int = 32,
    captions: bool = True,
    templates: Sequence[str] = DIGIT_TEMPLATES,
) -> ProbeSet:
    """``n`` of scikit-learn's 1797 handwritten digits, balanced over the ten classes and chosen with ``seed``.

    Each 8x8 grey image is scaled to 0..255 and resized bilinearly to ``image_size`` as RGB — the demo run's
    training images, pixel for pixel. Class names are "zero".."nine". Captions (``captions=True``) come from the demo's
    caption generator: a digit phrase ("a handwritten seven", "the number 7" ...) followed by random vocabulary words,
    so every caption is distinct, as in training. The demo run trains on these same digits, so on a demo run the
    probe measures how well the training data is represented, not generalisation.
    """
    if not 1 <= n <= 1797:
        raise ProbeError(f"the digits probe holds 1..1797 images, asked for {n}")
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    targets = np.asarray(digits.target, dtype=np.int64)
    idx = _balanced_choice(targets, n, seed)
    images = []
    for i in idx:
        pixels = (np.asarray(digits.images[i]) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        images.append(np.asarray(img.convert("RGB")))
    labels = targets[idx]
    caps: tuple[str, ...] | None = None
    if captions:
        from ckptstore.demo.trajectory import WORDS_PER_CAPTION, digit_captions

        caps = tuple(digit_captions([int(x) for x in labels], seed, WORDS_PER_CAPTION))
    return ProbeSet(
        name=f"digits-{n}-s{seed}",
        images=images,
        labels=labels,
        class_names=DIGIT_CLASSES,
        captions=caps,
        templates=tuple(templates),
        sources=tuple(f"sklearn.datasets.load_digits()[{int(i)}]" for i in idx),
    )


# ------------------------------------------------------------------------------------------------- folder


def _column(header: list[str], wanted: Sequence[str], given: str | None, path: Path) -> int | None:
    low = [h.strip().lower() for h in header]
    if given is not None:
        if given.strip().lower() not in low:
            raise ProbeError(f"no column {given!r} in the header {header}", path=str(path))
        return low.index(given.strip().lower())
    for name in wanted:
        if name in low:
            return low.index(name)
    return None


def _read_class_names(class_names: Sequence[str] | str | Path) -> tuple[str, ...]:
    if isinstance(class_names, str | Path):
        lines = Path(class_names).read_text().splitlines()
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(str(c) for c in class_names)


def folder_probe(
    csv_path: str | Path,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    separator: str | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    name: str | None = None,
    limit: int | None = None,
    root: str | Path | None = None,
) -> ProbeSet:
    """A probe set from a CSV listing image files with labels and/or captions (format in the module docstring).

    Columns are found by header name (``image``/``filepath``/``path``/``file``, ``label``, ``caption``/``title``/
    ``text``) unless named. ``class_names`` (a list, or a text file with one name per line) gives the names of
    integer labels, or the order of named labels. ``limit`` keeps the first rows only. Relative image paths are
    resolved against ``root`` (default: the CSV's folder; open_clip_train's own CSVs are relative to the folder the
    trainer ran in). Images are read (and checked) at once; a bad row raises :class:`ProbeError` naming the file and
    the row.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(csv_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ProbeError(f"cannot read the probe CSV: {exc.strerror or exc}", path=str(path)) from None
    lines = text.splitlines()
    if not lines:
        raise ProbeError("the probe CSV is empty", path=str(path))
    sep = separator or ("\t" if "\t" in lines[0] else ",")
    rows = list(csv.reader(lines, delimiter=sep))
    header, body = rows[0], [r for r in rows[1:] if any(c.strip() for c in r)]
    if limit is not None:
        body = body[:limit]
    if not body:
        raise ProbeError("the probe CSV has a header but no rows", path=str(path))
    img_col = _column(header, _IMAGE_COLUMNS, image_column, path)
    if img_col is None:
        raise ProbeError(
            f"no image column in the header {header}", path=str(path), hint="name it image, filepath, path or file"
        )
    lab_col = _column(header, _LABEL_COLUMNS, label_column, path)
    cap_col = _column(header, _CAPTION_COLUMNS, caption_column, path)
    if lab_col is None and cap_col is None:
        raise ProbeError(
            f"no label or caption column in the header {header}",
            path=str(path),
            hint="add a 'label' column (class) and/or a 'caption' column",
        )
    names = _read_class_names(class_names) if class_names is not None else ()
    base = Path(root) if root is not None else path.parent
    images: list[Image.Image] = []
    raw_labels: list[str] = []
    caps: list[str] = []
    sources: list[str] = []
    for lineno, row in enumerate(body, start=2):

        def cell(col: int, what: str, row: list[str] = row, lineno: int = lineno) -> str:
            if col >= len(row) or not row[col].strip():
                raise ProbeError(f"row {lineno}: no {what}", path=str(path))
            return row[col].strip() if what != "caption" else row[col]

        file = Path(cell(img_col, "image path"))
        full = file if file.is_absolute() else base / file
        try:
            with Image.open(full) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            why = "no such file" if isinstance(exc, FileNotFoundError) else f"not a readable image ({exc})"
            raise ProbeError(f"row {lineno}: {full}: {why}", path=str(path)) from None
        sources.append(str(full))
        if lab_col is not None:
            raw_labels.append(cell(lab_col, "label"))
        if cap_col is not None:
            caps.append(cell(cap_col, "caption"))
    labels: np.ndarray | None = None
    if lab_col is not None:
        labels, names = _parse_labels(raw_labels, names, path)
    return ProbeSet(
        name=name or path.stem,
        images=images,
        labels=labels,
        class_names=names,
        captions=tuple(caps) if cap_col is not None else None,
        templates=tuple(templates),
        sources=tuple(sources),
    )


def _parse_labels(raw: list[str], names: tuple[str, ...], path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels as indices into the class names, and the names. A label is a class name, or else an integer index.
    Without ``names``: integer labels name their classes "0".."max"; otherwise the distinct labels, sorted."""
    if not names:
        if all(_is_int(r) for r in raw):
            names = tuple(str(i) for i in range(max(0, max(int(r) for r in raw)) + 1))
        else:
            names = tuple(sorted(set(raw)))
    index = {n: i for i, n in enumerate(names)}
    out = []
    for lineno, r in enumerate(raw, start=2):
        if r in index:
            out.append(index[r])
        elif _is_int(r):
            if not 0 <= int(r) < len(names):
                raise ProbeError(f"row {lineno}: label {int(r)} is outside 0..{len(names) - 1}", path=str(path))
            out.append(int(r))
        else:
            raise ProbeError(f"row {lineno}: label {r!r} is not one of the class names", path=str(path))
    return np.asarray(out, dtype=np.int64), names


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def load_probe(spec: str | Path, *, n: int | None = None, seed: int = 0, **kwargs: Any) -> ProbeSet:
    """``"digits"`` (:func:`digits_probe` with ``n`` images, 200 by default) or a CSV path (:func:`folder_probe`,
    the first ``n`` rows)."""
    if str(spec) == "digits":
        return digits_probe(200 if n is None else n, seed=seed, **kwargs)
    if not Path(spec).is_file():
        raise ProbeError(f"no probe file {str(spec)!r}", hint="give 'digits' or a CSV of images (see docs)")
    return folder_probe(spec, limit=n, **kwargs)


def chance_accuracy(probe: ProbeSet) -> float:
    """Top-1 accuracy of always guessing the most frequent class (the floor a classifier must beat)."""
    if probe.labels is None:
        return math.nan
    return float(np.bincount(probe.labels).max() / len(probe))
