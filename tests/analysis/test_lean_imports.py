"""``ckpt report``'s lean imports, each in a fresh process (what they change is what a process has imported):
open_clip's registry read without importing open_clip (release._open_clip_config), and open_clip imported without
the optional libraries a model config does not use (representations.import_open_clip_for)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytest.importorskip("timm")

_SRC = Path(__file__).resolve().parents[2] / "src"


def _python(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(_SRC), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_registry_entries_read_without_importing_open_clip_equal_open_clips_own() -> None:
    got = _python("""
        import json, sys
        from ckptstore.release import _open_clip_config
        names = ["ViT-B-32", "RN50", "ViT-B-16-SigLIP", "coca_ViT-B-32", "nope", "../ViT-B-32", ".x"]
        lean = {n: _open_clip_config(n) for n in names}
        imported = "open_clip" in sys.modules
        import open_clip
        own = {n: (open_clip.get_model_config(n) if "/" not in n else None) for n in names}
        print(json.dumps({"imported": imported, "same": lean == own, "found": sorted(n for n in lean if lean[n])}))
    """)
    assert got["imported"] is False  # the lookup alone imports nothing
    assert got["same"] is True
    assert got["found"] == ["RN50", "ViT-B-16-SigLIP", "ViT-B-32", "coca_ViT-B-32"]


def test_open_clip_without_transformers_and_timm_builds_the_same_clip_and_hides_nothing_afterwards() -> None:
    got = _python("""
        import json, sys, torch
        from ckptstore.analysis.representations import build_openclip_model, import_open_clip_for
        from ckptstore.demo.trajectory import tiny_model_config
        cfg = tiny_model_config("tiny")
        hidden = import_open_clip_for(cfg)
        loaded = {m: m in sys.modules for m in ("open_clip", "transformers", "timm")}
        torch.manual_seed(0)
        sd = build_openclip_model(cfg).state_dict()
        import transformers, timm  # visible again: importable as usual
        print(json.dumps({"hidden": hidden, "loaded": loaded, "again": import_open_clip_for(cfg),
                          "weights": {k: [list(v.shape), v.double().sum().item()] for k, v in sd.items()}}))
    """)
    assert got["hidden"] == ["transformers", "timm"]
    assert got["loaded"] == {"open_clip": True, "transformers": False, "timm": False}
    assert got["again"] == []  # open_clip already imported: nothing to do
    # the same model as in a process that imported open_clip in full (same seed, same initial weights)
    full = _python("""
        import json, torch, open_clip
        from ckptstore.analysis.representations import build_openclip_model
        from ckptstore.demo.trajectory import tiny_model_config
        torch.manual_seed(0)
        sd = build_openclip_model(tiny_model_config("tiny")).state_dict()
        print(json.dumps({k: [list(v.shape), v.double().sum().item()] for k, v in sd.items()}))
    """)
    assert got["weights"] == full


def test_a_config_that_uses_a_library_gets_it() -> None:
    got = _python("""
        import json, sys
        from ckptstore.analysis.representations import import_open_clip_for
        cfg = {"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224"},
               "text_cfg": {"hf_model_name": "bert-base-uncased"}}
        hidden = import_open_clip_for(cfg)
        from open_clip import hf_model, timm_model
        print(json.dumps({"hidden": hidden, "hf": hf_model.transformers is not None,
                          "timm": timm_model.timm is not None}))
    """)
    assert got == {"hidden": [], "hf": True, "timm": True}
