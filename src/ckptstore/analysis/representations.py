"""How a model's representations of a fixed probe set evolve over a run (docs/analysis-representations.md).

:func:`analyze_representations` rebuilds the OpenCLIP model of each checkpoint in turn (one model in memory: the
architecture is built once and each checkpoint's weights are loaded into it, strictly), shows it the probe's images
and texts, and records per checkpoint:

* the final image and text embeddings (L2-normalised ``encode_image`` / ``encode_text``);
* the output of every transformer block (``visual.transformer.resblocks.N``, ``transformer.resblocks.N``), pooled
  over tokens (``pooling="mean"``: the mean over all image tokens, class token included, and over the text tokens up
  to and including the end-of-text token, where open_clip pools; ``pooling="token"``: the class token of an image,
  the end-of-text token of a text — the positions the model itself reads its embedding from);
* zero-shot top-1/top-5 accuracy (each class embedded with every prompt template, open_clip's
  ``build_zero_shot_classifier``: normalised embeddings averaged and renormalised);
* image→text and text→image retrieval recall@1/5/10 (each image paired with its caption);
* effective dimensionality of the image and text embeddings: the participation ratio of the covariance eigenvalues
  ``(Σλ)² / Σλ²`` (``effective_dim``), and the entropy effective rank ``exp(-Σ p log p)``, ``p = σ / Σσ`` over the
  singular values of the centred embeddings (``effective_rank``; Roy & Vetterli 2007);

then the linear-CKA matrices (:mod:`ckptstore.analysis.cka`) between checkpoints for the image embeddings, the text
embeddings and each block. :func:`analyze_module_representations` is the same comparison for any ``nn.Module``.

torch and open_clip are imported inside the functions, so importing this module (and ``ckptstore.analysis``)
stays free of torch.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from ckptstore.analysis.cka import cka_matrix
from ckptstore.analysis.trajectory import Point, Trajectory, TrajectoryError
from ckptstore.errors import CkptStoreError, MissingDependencyError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptstore.analysis.probes import ProbeSet

__all__ = [
    "BLOCK_PATTERN",
    "ModuleRepresentations",
    "OpenClipRunner",
    "RepresentationError",
    "RepresentationEvolution",
    "analyze_module_representations",
    "analyze_representations",
    "block_names",
    "build_openclip_model",
    "effective_dimension",
    "effective_rank",
    "import_open_clip_for",
    "model_config_for",
    "retrieval_recall",
    "zero_shot_accuracy",
]

Pooling = Literal["mean", "token"]
#: The modules hooked as "blocks": open_clip's residual attention blocks, in both towers.
BLOCK_PATTERN = re.compile(r"(^|\.)resblocks\.\d+$")
RECALL_KS = (1, 5, 10)
DEFAULT_BATCH_SIZE = 256
#: Preprocessed probe images are kept for all checkpoints up to this many bytes, else re-made per checkpoint.
_PIXEL_CACHE_BYTES = 256 * 2**20


class RepresentationError(CkptStoreError, ValueError):
    """A representation analysis cannot run as asked (no model config, weights that do not fit, unknown layer)."""


def need_torch(open_clip: bool = True) -> None:
    """Fail with one clear line when torch (or open_clip, unless ``open_clip=False``) is missing."""
    import importlib

    try:
        importlib.import_module("torch")
        if open_clip:
            importlib.import_module("open_clip")
    except ImportError as exc:
        raise MissingDependencyError(
            f"representation analyses need torch and open_clip ({exc.name} is missing)",
            hint="pip install 'ckptstore[openclip]'",
        ) from None


# ----------------------------------------------------------------------------------------------- measures


def effective_dimension(x: np.ndarray) -> float:
    """Participation ratio ``(Σλ)² / Σλ²`` of the covariance eigenvalues of ``x`` (rows are examples).

    1 when the points lie on a line, ``d`` when they fill ``d`` dimensions evenly; NaN when there is no variance.
    """
    return _participation_ratio(_centred_singular_values(x))


def effective_rank(x: np.ndarray) -> float:
    """Entropy effective rank ``exp(-Σ p log p)``, ``p = σ / Σσ`` over the singular values of centred ``x``."""
    return _entropy_rank(_centred_singular_values(x))


def _participation_ratio(s: np.ndarray) -> float:
    ev = s**2  # covariance eigenvalues, up to the common factor 1 / (n - 1) that the ratio cancels
    total = float(ev.sum())
    return math.nan if total == 0.0 else total**2 / float((ev**2).sum())


def _entropy_rank(s: np.ndarray) -> float:
    total = float(s.sum())
    if total == 0.0:
        return math.nan
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _centred_singular_values(x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    arr = arr.reshape(arr.shape[0], -1) - arr.reshape(arr.shape[0], -1).mean(axis=0, keepdims=True)
    return np.asarray(np.linalg.svd(arr, compute_uv=False))


def retrieval_recall(
    image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[str, dict[str, float]]:
    """Recall@k of image→text and text→image retrieval, image ``i`` paired with text ``i``, by cosine similarity.

    The rank of the true pair is the number of candidates scoring strictly higher (open_clip's ``get_clip_metrics``
    without its arbitrary tie order): a candidate tied with the true one does not push it down, so a duplicate
    caption counts as a hit.
    """
    img = np.asarray(image_emb, dtype=np.float64)
    txt = np.asarray(text_emb, dtype=np.float64)
    if img.shape[0] != txt.shape[0]:
        raise RepresentationError(f"retrieval pairs images with captions: {img.shape[0]} vs {txt.shape[0]}")
    img = img / np.linalg.norm(img, axis=1, keepdims=True).clip(min=1e-30)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True).clip(min=1e-30)
    sim = img @ txt.T
    out: dict[str, dict[str, float]] = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        true = np.diag(s)[:, None]
        rank = (s > true).sum(axis=1)
        out[name] = {f"R@{k}": float((rank < k).mean()) for k in ks}
    return out


def zero_shot_accuracy(
    image_emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of ``image_emb @ classifier`` (``d x C``, one column per class), as open_clip's zero-shot
    evaluation counts it; ``k`` beyond the number of classes is clipped to it. Keys ``top1``, ``top5``..."""
    logits = np.asarray(image_emb, dtype=np.float64) @ np.asarray(classifier, dtype=np.float64)
    order = np.argsort(-logits, axis=1, kind="stable")
    hits = order == np.asarray(labels)[:, None]
    return {f"top{k}": float(hits[:, : min(k, logits.shape[1])].any(axis=1).mean()) for k in ks}


# ---------------------------------------------------------------------------------------------- OpenCLIP


def model_config_for(point: Point, given: Mapping[str, Any] | str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The open_clip model config of a checkpoint from its metadata, and where it came from.

    :func:`ckptstore.release.resolve_model_config` on a :class:`Point`'s metadata (so ``.pt`` files and store runs
    resolve alike): ``given``; ``metadata.model_config``; open_clip's registry for ``metadata.model``; a
    ``model_configs/<name>.json`` near the checkpoint's source file.
    """
    from ckptstore.release import resolve_model_config

    return resolve_model_config(point.metadata, given, ref=point.label)


#: open_clip's optional imports (``try: import ...``) that only some model families use: HF text towers
#: (``text_cfg.hf_model_name``; also CoCa's ``generate``) and timm vision towers (``vision_cfg.timm_model_name``).
_OPTIONAL_OPEN_CLIP_DEPS = (("transformers", "text_cfg", "hf_model_name"), ("timm", "vision_cfg", "timm_model_name"))


def import_open_clip_for(config: Mapping[str, Any]) -> list[str]:
    """Import open_clip for building ``config`` only, leaving out the optional libraries the config does not use;
    the libraries left out. For a program that builds nothing else with open_clip in its process (``ckpt report``).

    ``import open_clip`` imports transformers (1.2 s on the demo machine) and timm (0.4 s) inside ``try`` blocks
    that fall back to "not installed". A config without ``text_cfg.hf_model_name`` (``vision_cfg.timm_model_name``)
    never reaches the code that uses transformers (timm), so they are hidden while open_clip imports (a ``None``
    entry in ``sys.modules`` makes ``import`` raise ImportError) and visible again right after: a later ``import
    transformers`` works as usual, but this process's open_clip keeps building HF text towers (timm vision towers)
    as if they were not installed. Nothing is left out when open_clip, or the library, is already imported; an HF
    tokenizer (``hf_tokenizer_name``) imports transformers when it is made, so it still works.
    """
    if "open_clip" in sys.modules:
        return []
    hidden = [
        lib
        for lib, section, key in _OPTIONAL_OPEN_CLIP_DEPS
        if key not in (config.get(section) or {}) and lib not in sys.modules
    ]
    for lib in hidden:
        sys.modules[lib] = None  # type: ignore[assignment]
    try:
        import open_clip  # noqa: F401
    finally:
        for lib in hidden:
            if lib in sys.modules and sys.modules[lib] is None:
                del sys.modules[lib]
    return hidden


def build_openclip_model(config: Mapping[str, Any]) -> nn.Module:
    """An fp32, eval-mode open_clip model (``CLIP``, ``CustomTextCLIP`` or ``CoCa``, as ``open_clip.create_model``
    would choose) from a config dict, without touching open_clip's global model registry. No weights loaded."""
    need_torch()
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(dict(config))
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # the checkpoint supplies every weight
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        text_cfg["hf_model_pretrained"] = False
    custom = bool(cfg.pop("custom_text", False)) or hf_text
    cls: Any = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom else CLIP
    try:
        model = cls(**cfg)
    except (TypeError, KeyError, ValueError, AssertionError) as exc:
        raise RepresentationError(f"cannot build an open_clip model from the config: {exc}") from None
    return cast("nn.Module", model.float().eval())


def _tokenizer(config: Mapping[str, Any], name: str | None) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the config: an HF tokenizer when the text tower names one, SigLIP's for SigLIP
    models, else CLIP's BPE ``SimpleTokenizer`` at the config's context length."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = config.get("text_cfg", {})
    context = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if text_cfg.get("hf_tokenizer_name"):
        return cast(
            "Callable[..., torch.Tensor]",
            HFTokenizer(
                text_cfg["hf_tokenizer_name"],
                context_length=context,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **kwargs,
            ),
        )
    if name and "siglip" in name.lower() and open_clip.get_model_config(name):
        return cast("Callable[..., torch.Tensor]", open_clip.get_tokenizer(name))
    return cast("Callable[..., torch.Tensor]", SimpleTokenizer(context_length=context, **kwargs))


def _image_transform(model: nn.Module, metadata: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The evaluation transform ``create_model_and_transforms`` would give: open_clip's defaults at the model's image
    size, with the normalisation (and resize settings) the run trained with (params.txt)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from ckptstore.release import preprocess_config

    base = asdict(PreprocessCfg())
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "image_size"):
        base["size"] = visual.image_size
    overrides = preprocess_config(metadata)
    cfg = PreprocessCfg(**merge_preprocess_dict(base, overrides))
    return cast("Callable[[Any], torch.Tensor]", image_transform_v2(cfg, is_train=False))


class OpenClipRunner:
    """One open_clip model reused for every checkpoint of a trajectory, and the probe's inputs, prepared once.

    The architecture comes from ``model_config`` (a dict or a JSON file) or the first checkpoint's metadata
    (:func:`model_config_for`); :meth:`load` copies a checkpoint's weights into it (``strict=True``: a checkpoint
    that does not fit the architecture is an error, never a silent partial load).
    """

    def __init__(self, traj: Trajectory, *, model_config: Mapping[str, Any] | str | Path | None = None) -> None:
        need_torch()
        self.traj = traj
        self.config, self.config_source = model_config_for(traj.points[0], model_config)
        meta = traj.points[0].metadata
        name = meta.get("model") or (meta.get("hparams") or {}).get("model")
        self.model_name = str(name) if name else None
        self.model: Any = build_openclip_model(self.config)  # an open_clip CLIP: encode_image, visual ...
        self.preprocess = _image_transform(self.model, meta)
        self.tokenizer = _tokenizer(self.config, self.model_name)
        self.loaded: int | None = None
        self._pixels: tuple[ProbeSet, torch.Tensor] | None = None  # the last probe's preprocessed images

    def load(self, index: int) -> nn.Module:
        """The model with checkpoint ``index``'s weights."""
        import torch

        sd = self.traj.state_dict(index)
        logit_scale = getattr(self.model, "logit_scale", None)
        stored = sd.get("logit_scale")
        if (
            isinstance(stored, torch.Tensor)
            and isinstance(logit_scale, torch.Tensor)
            and stored.ndim != logit_scale.ndim
        ):
            sd["logit_scale"] = stored.reshape(logit_scale.shape)  # scalar vs 1-element, as open_clip's loader allows
        try:
            self.model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise RepresentationError(
                f"{self.traj.points[index].label}: the weights do not fit the model config ({self.config_source}): "
                + _first_line(str(exc)),
                hint="pass the right --model-config FILE",
            ) from None
        self.loaded = index
        return self.model

    # ------------------------------------------------------------------ inputs
    def pixel_batches(self, probe: ProbeSet, batch_size: int) -> Iterator[torch.Tensor]:
        """The probe's images through the evaluation transform, in batches (cached across checkpoints if small)."""
        import torch

        if self._pixels is not None and self._pixels[0] is probe:
            yield from torch.split(self._pixels[1], batch_size)
            return
        first = self.preprocess(probe.image(0))
        if first.numel() * first.element_size() * len(probe) <= _PIXEL_CACHE_BYTES:
            pixels = torch.stack([first] + [self.preprocess(probe.image(i)) for i in range(1, len(probe))])
            self._pixels = (probe, pixels)
            yield from torch.split(pixels, batch_size)
            return
        for start in range(0, len(probe), batch_size):
            stop = min(start + batch_size, len(probe))
            yield torch.stack([self.preprocess(probe.image(i)) for i in range(start, stop)])

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    # ------------------------------------------------------------------ forward passes
    def encode_images(
        self, probe: ProbeSet, batch_size: int = DEFAULT_BATCH_SIZE, *, pre_projection: bool = False
    ) -> np.ndarray:
        """The loaded checkpoint's image embeddings of the probe, ``(n, d)`` float32: L2-normalised final
        embeddings, or (``pre_projection``) the pooled vision-tower features before the projection, as they are."""
        import torch

        out = []
        with torch.inference_mode(), self._without_projection(pre_projection):
            for batch in self.pixel_batches(probe, batch_size):
                if pre_projection:
                    feats = self.model.visual(batch)
                    feats = feats[0] if isinstance(feats, tuple) else feats
                else:
                    feats = self.model.encode_image(batch, normalize=True)
                out.append(feats.float().numpy())
        return np.concatenate(out)

    def encode_texts(self, tokens: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """L2-normalised text embeddings of tokenised texts, ``(n, d)`` float32."""
        import torch

        out = []
        with torch.inference_mode():
            for batch in torch.split(tokens, batch_size):
                out.append(self.model.encode_text(batch, normalize=True).float().numpy())
        return np.concatenate(out)

    def zero_shot_classifier(self, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """``d x C`` class embeddings: open_clip's ``build_zero_shot_classifier`` (or its arithmetic, for an
        open_clip without it): per class, the mean of the prompts' normalised embeddings, renormalised."""
        import open_clip
        import torch

        build = getattr(open_clip, "build_zero_shot_classifier", None)
        with torch.inference_mode():
            if build is not None:
                weights = build(self.model, self.tokenizer, list(class_names), list(templates), device="cpu")
            else:  # pragma: no cover - open_clip < 2.23
                emb = self.model.encode_text(
                    self.tokenizer([t.format(c) for c in class_names for t in templates]), normalize=True
                )
                emb = emb.reshape(len(class_names), len(templates), -1).mean(dim=1)
                weights = (emb / emb.norm(dim=1, keepdim=True)).T
        return np.asarray(weights.float().numpy())

    @contextmanager
    def _without_projection(self, active: bool) -> Iterator[None]:
        visual = getattr(self.model, "visual", None)
        if not active:
            yield
            return
        if visual is None or not hasattr(visual, "proj"):
            raise RepresentationError(
                f"pre-projection features need a vision tower with a 'proj' projection; "
                f"{type(visual).__name__} has none",
                hint="use the final embedding instead",
            )
        proj = visual.proj
        visual.proj = None
        try:
            yield
        finally:
            visual.proj = proj


def _first_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------ hooks


class _BlockRecorder:
    """Forward hooks on the blocks that keep each batch's output pooled over tokens to ``(batch, width)``."""

    def __init__(self, model: nn.Module, names: Sequence[str], pooling: Pooling) -> None:
        self.pooling = pooling
        self.active: str | None = None  # "image" or "text": only blocks of that tower record
        self.text_mask: torch.Tensor | None = None  # (batch, L) for the text batch running now
        self.text_pick: torch.Tensor | None = None  # (batch,) end-of-text positions
        self.out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            parent = modules.get(name.rsplit(".resblocks.", 1)[0])
            batch_first = bool(getattr(parent, "batch_first", True))
            tower = "image" if name.startswith("visual.") else "text"
            self._handles.append(modules[name].register_forward_hook(self._hook(name, tower, batch_first)))

    def _hook(self, name: str, tower: str, batch_first: bool) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if self.active != tower:
                return
            x = output[0] if isinstance(output, tuple) else output
            if not batch_first:
                x = x.transpose(0, 1)
            x = x.float()
            if tower == "image":
                pooled = x.mean(dim=1) if self.pooling == "mean" else x[:, 0]
            elif self.pooling == "mean" and self.text_mask is not None:
                m = self.text_mask.to(x.dtype)[:, : x.shape[1], None]
                pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
            elif self.text_pick is not None:
                pooled = x[range(x.shape[0]), self.text_pick]
            else:
                pooled = x.mean(dim=1)
            self.out[name].append(pooled.numpy().copy())

        return hook

    def take(self) -> dict[str, np.ndarray]:
        """The recorded activations since the last call, one ``(n, width)`` array per block."""
        got = {n: np.concatenate(v) for n, v in self.out.items() if v}
        for v in self.out.values():
            v.clear()
        return got

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks of an open_clip model, vision tower first, in order."""
    names = [n for n, _ in model.named_modules() if BLOCK_PATTERN.search(n)]
    return [n for n in names if n.startswith("visual.")] + [n for n in names if not n.startswith("visual.")]


# ------------------------------------------------------------------------------------------------ results


def _clean(obj: Any) -> Any:
    """JSON-ready: numpy arrays and scalars to lists and floats, NaN and infinity to None."""
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class RepresentationEvolution:
    """Per-checkpoint representation measures of one probe set, and CKA between checkpoints. ``to_dict()`` is the
    JSON record (docs/analysis-representations.md); the embeddings stay available here for further analysis."""

    points: list[Point]
    probe: dict[str, Any]
    image_embeddings: list[np.ndarray]
    text_embeddings: list[np.ndarray]
    texts: Literal["captions", "prompts"]
    cka_image: np.ndarray
    cka_text: np.ndarray
    cka_blocks: dict[str, np.ndarray] = field(default_factory=dict)
    #: Per block, per checkpoint: the pooled block outputs, ``(n_images or n_texts, width)`` float32.
    block_activations: dict[str, list[np.ndarray]] = field(default_factory=dict)
    zero_shot: dict[str, list[float]] | None = None
    retrieval: dict[str, dict[str, list[float]]] | None = None
    effective_dim: dict[str, list[float]] = field(default_factory=dict)
    effective_rank: dict[str, list[float]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)

    def cka_to_final(self, which: str = "image") -> list[float]:
        """CKA of every checkpoint's representation (``"image"``, ``"text"`` or a block name) with the last one's."""
        mat = {"image": self.cka_image, "text": self.cka_text}.get(which)
        mat = self.cka_blocks[which] if mat is None else mat
        return [float(v) for v in mat[:, -1]]

    def to_dict(self) -> dict[str, Any]:
        cka: dict[str, Any] = {"image": self.cka_image, "text": self.cka_text}
        if self.cka_blocks:
            cka["blocks"] = self.cka_blocks
        out: dict[str, Any] = {
            "points": [p.as_dict() for p in self.points],
            "probe": {**self.probe, "texts": self.texts},
            "cka": cka,
        }
        if self.zero_shot is not None:
            out["zero_shot"] = self.zero_shot
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval
        out["effective_dim"] = self.effective_dim
        out["effective_rank"] = self.effective_rank
        out["model"] = self.model
        out["seconds"] = [round(s, 3) for s in self.seconds]
        return cast("dict[str, Any]", _clean(out))


# ----------------------------------------------------------------------------------------------- analysis


def _text_mask(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which token positions a text's block activations pool over, and each text's end-of-text position."""
    import torch

    text_pool = getattr(model, "text_pool_type", "argmax")
    eot = tokens.argmax(dim=-1)  # CLIP's BPE ends a text with its largest id, where open_clip pools ('argmax')
    positions = torch.arange(tokens.shape[1])[None, :]
    mask = positions <= eot[:, None] if text_pool == "argmax" else tokens != 0
    return mask, eot


def _encode_texts(
    model: Any, recorder: _BlockRecorder, tokens: torch.Tensor, mask: torch.Tensor, eot: torch.Tensor, batch: int
) -> np.ndarray:
    """The normalised text embeddings of ``tokens``, in batches, with the block recorder taking text activations."""
    import torch

    recorder.active = "text"
    parts = []
    with torch.inference_mode():
        for sl in _slices(len(tokens), batch):
            recorder.text_mask, recorder.text_pick = mask[sl], eot[sl]
            parts.append(model.encode_text(tokens[sl], normalize=True).float().numpy())
    recorder.active = None
    return np.concatenate(parts)


@dataclass
class _Measures:
    """The per-checkpoint series: zero-shot top-k, retrieval recall, effective dimension and rank."""

    top: dict[str, list[float]] = field(default_factory=lambda: {"top1": [], "top5": []})
    recall: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {d: {f"R@{k}": [] for k in RECALL_KS} for d in ("image_to_text", "text_to_image")}
    )
    eff: dict[str, list[float]] = field(default_factory=lambda: {"image": [], "text": []})
    erank: dict[str, list[float]] = field(default_factory=lambda: {"image": [], "text": []})

    def add(self, probe: ProbeSet, runner: OpenClipRunner, img: np.ndarray, txt: np.ndarray) -> None:
        if probe.labels is not None:
            classifier = runner.zero_shot_classifier(probe.class_names, probe.templates)
            for k, v in zero_shot_accuracy(img, classifier, probe.labels).items():
                self.top[k].append(v)
        if probe.captions is not None:
            for d, vals in retrieval_recall(img, txt).items():
                for k, v in vals.items():
                    self.recall[d][k].append(v)
        for key, emb in (("image", img), ("text", txt)):
            sv = _centred_singular_values(emb)
            self.eff[key].append(_participation_ratio(sv))
            self.erank[key].append(_entropy_rank(sv))


def analyze_representations(
    traj: Trajectory,
    probe: ProbeSet,
    *,
    model_config: Mapping[str, Any] | str | Path | None = None,
    blocks: bool = True,
    pooling: Pooling = "mean",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> RepresentationEvolution:
    """Embed ``probe`` with every checkpoint of ``traj`` (an OpenCLIP run) and measure how the representations move.

    The texts embedded are the probe's captions, or (without captions) its class prompts, ``class_names x
    templates``. Zero-shot accuracy needs labels, retrieval needs captions; what the probe lacks is left out.
    ``progress(done, total)`` is called after each checkpoint. Cost: one forward pass of the probe's images and
    texts per checkpoint, plus ``T^2`` CKA products of ``n x n`` Gram matrices.
    """
    if pooling not in ("mean", "token"):
        raise RepresentationError(f"pooling must be 'mean' or 'token', got {pooling!r}")
    if batch_size < 1:
        raise RepresentationError(f"batch_size must be >= 1, got {batch_size}")
    runner = OpenClipRunner(traj, model_config=model_config)
    texts: Literal["captions", "prompts"] = "captions" if probe.captions is not None else "prompts"
    text_list = list(probe.captions) if probe.captions is not None else probe.prompts()
    tokens = runner.tokens(text_list)
    model = runner.model
    names = block_names(model) if blocks else []
    recorder = _BlockRecorder(model, names, pooling)
    mask, eot = _text_mask(model, tokens)

    t = len(traj)
    images: list[np.ndarray] = []
    text_emb: list[np.ndarray] = []
    acts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    measures = _Measures()
    seconds: list[float] = []
    try:
        for i in range(t):
            start = time.perf_counter()
            runner.load(i)
            recorder.active = "image"
            img = runner.encode_images(probe, batch_size)
            txt = _encode_texts(model, recorder, tokens, mask, eot, batch_size)
            for name, a in recorder.take().items():
                acts[name].append(a)
            images.append(img)
            text_emb.append(txt)
            measures.add(probe, runner, img, txt)
            seconds.append(time.perf_counter() - start)
            if progress is not None:
                progress(i + 1, t)
    finally:
        recorder.remove()
    return RepresentationEvolution(
        points=list(traj.points),
        probe=probe.describe(),
        image_embeddings=images,
        text_embeddings=text_emb,
        texts=texts,
        cka_image=cka_matrix(images),
        cka_text=cka_matrix(text_emb),
        cka_blocks={n: cka_matrix(acts[n]) for n in names},
        block_activations=acts,
        zero_shot=measures.top if probe.labels is not None else None,
        retrieval=measures.recall if probe.captions is not None else None,
        effective_dim=measures.eff,
        effective_rank=measures.erank,
        model={
            "name": runner.model_name,
            "config_source": runner.config_source,
            "pooling": pooling,
            "blocks": names,
            "embed_dim": int(images[0].shape[1]),
        },
        seconds=seconds,
    )


def _slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ---------------------------------------------------------------------------------------- any nn.Module


@dataclass
class ModuleRepresentations:
    """CKA across checkpoints and effective dimensionality of a model's output (and chosen layers) on fixed inputs."""

    points: list[Point]
    outputs: list[np.ndarray]
    layers: dict[str, list[np.ndarray]]
    cka_output: np.ndarray
    cka_layers: dict[str, np.ndarray]
    effective_dim: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "points": [p.as_dict() for p in self.points],
            "n_inputs": int(self.outputs[0].shape[0]) if self.outputs else 0,
            "cka": {"output": self.cka_output, "layers": self.cka_layers},
            "effective_dim": self.effective_dim,
        }
        return cast("dict[str, Any]", _clean(out))


def _first_tensor(obj: Any, what: str) -> torch.Tensor:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, list | tuple) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise RepresentationError(
        f"{what} is a {type(obj).__name__}, not a tensor", hint="pass output_fn to pick the tensor to compare"
    )


def analyze_module_representations(
    traj: Trajectory,
    factory: Callable[[], nn.Module],
    inputs: Any,
    *,
    layers: Sequence[str] | None = None,
    output_fn: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModuleRepresentations:
    """The representation comparison for any ``nn.Module``: ``factory()`` builds the architecture once, each
    checkpoint's weights are loaded into it (``strict=True``), and ``model(inputs)`` runs in eval mode.

    ``inputs`` is a tensor or array batched along its first axis (or a tuple of them: positional arguments).
    ``output_fn(output)`` picks the tensor to compare from the model's output (default: the output itself, or its
    first element). ``layers`` names modules (``model.named_modules()``) whose outputs are compared too (a tuple
    output: its first element). Every representation is flattened to ``(n, -1)`` per input.
    """
    need_torch(open_clip=False)
    import torch

    args = inputs if isinstance(inputs, tuple) else (inputs,)
    args = tuple(torch.as_tensor(a) for a in args)
    n = int(args[0].shape[0])
    model = factory()
    model.eval()
    modules = dict(model.named_modules())
    layer_names = list(layers or [])
    unknown = [name for name in layer_names if name not in modules]
    if unknown:
        sample = ", ".join(list(modules)[1:8])
        raise RepresentationError(f"no layer {unknown[0]!r} in the model", hint=f"layers are named like {sample}")
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            captured[name].append(_first_tensor(out, f"layer {name!r}'s output").detach().float().reshape(-1))

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layer_names]
    outputs: list[np.ndarray] = []
    layer_acts: dict[str, list[np.ndarray]] = {name: [] for name in layer_names}
    size = batch_size or n
    try:
        for i in range(len(traj)):
            try:
                model.load_state_dict(traj.state_dict(i), strict=True)
            except RuntimeError as exc:
                raise RepresentationError(
                    f"{traj.points[i].label}: the weights do not fit the model: {_first_line(str(exc))}"
                ) from None
            parts = []
            with torch.inference_mode():
                for sl in _slices(n, size):
                    out = model(*(a[sl] for a in args))
                    out = output_fn(out) if output_fn is not None else out
                    parts.append(_first_tensor(out, "the model's output").float().reshape(sl.stop - sl.start, -1))
            outputs.append(torch.cat(parts).numpy())
            for name in layer_names:
                layer_acts[name].append(torch.cat(captured[name]).reshape(n, -1).numpy())
                captured[name].clear()
            if progress is not None:
                progress(i + 1, len(traj))
    finally:
        for h in handles:
            h.remove()
    if not outputs:
        raise TrajectoryError("a trajectory needs at least one checkpoint")
    return ModuleRepresentations(
        points=list(traj.points),
        outputs=outputs,
        layers=layer_acts,
        cka_output=cka_matrix(outputs),
        cka_layers={name: cka_matrix(v) for name, v in layer_acts.items()},
        effective_dim={
            "output": [effective_dimension(o) for o in outputs],
            "layers": {name: [effective_dimension(a) for a in v] for name, v in layer_acts.items()},
        },
    )
