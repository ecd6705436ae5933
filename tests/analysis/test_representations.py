"""Representation evolution on the real demo run: the JSON contract, agreement with open_clip's own zero-shot
evaluation and with the retrieval metrics open_clip_train logged, store == files, and the generic nn.Module path."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("sklearn")

from ckptstore.analysis.probes import digits_probe, folder_probe  # noqa: E402
from ckptstore.analysis.representations import (  # noqa: E402
    OpenClipRunner,
    RepresentationError,
    analyze_module_representations,
    analyze_representations,
    effective_dimension,
    effective_rank,
    retrieval_recall,
    zero_shot_accuracy,
)
from ckptstore.analysis.trajectory import FileTrajectory, MemoryTrajectory, StoreTrajectory  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.errors import CkptStoreError  # noqa: E402

PROBE_N = 200


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt_dir() -> Path:
    pytest.importorskip("open_clip_train")
    return tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)


@pytest.fixture(scope="module")
def probe() -> Any:
    return digits_probe(PROBE_N, seed=0)


@pytest.fixture(scope="module")
def result(ckpt_dir: Path, probe: Any) -> Any:
    return analyze_representations(FileTrajectory(sorted(ckpt_dir.glob("epoch_*.pt"))), probe)


# ------------------------------------------------------------------------------------------------ contract


def test_json_contract(result: Any) -> None:
    d = result.to_dict()
    t = 2
    assert {"points", "probe", "cka", "zero_shot", "retrieval", "effective_dim"} <= set(d)
    assert [p["epoch"] for p in d["points"]] == [1, 2]
    assert set(d["points"][0]) == {"index", "label", "step", "epoch"}
    assert d["probe"]["name"] == f"digits-{PROBE_N}-s0"
    assert d["probe"]["n_images"] == d["probe"]["n_texts"] == PROBE_N
    assert d["probe"]["classes"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for key in ("image", "text"):
        mat = np.asarray(d["cka"][key])
        assert mat.shape == (t, t)
        np.testing.assert_allclose(np.diag(mat), 1.0)
        np.testing.assert_array_equal(mat, mat.T)
    blocks = d["cka"]["blocks"]
    assert list(blocks) == [f"visual.transformer.resblocks.{i}" for i in range(3)] + [
        f"transformer.resblocks.{i}" for i in range(3)
    ]
    for mat in blocks.values():
        assert np.asarray(mat).shape == (t, t) and all(0.0 <= v <= 1.0 for row in mat for v in row)
    assert set(d["zero_shot"]) >= {"top1", "top5"} and all(len(v) == t for v in d["zero_shot"].values())
    for direction in ("image_to_text", "text_to_image"):
        assert set(d["retrieval"][direction]) == {"R@1", "R@5", "R@10"}
        for vals in d["retrieval"][direction].values():
            assert len(vals) == t and all(0.0 <= v <= 1.0 for v in vals)
    for key in ("image", "text"):
        assert len(d["effective_dim"][key]) == t
        assert all(1.0 <= v <= 128 for v in d["effective_dim"][key])
    json.dumps(d, allow_nan=False)  # no NaN anywhere
    assert d["model"]["name"] == "ckpt-tiny-ViT" and d["model"]["embed_dim"] == 128


def test_embeddings_are_normalised_and_kept(result: Any) -> None:
    assert len(result.image_embeddings) == 2
    assert result.image_embeddings[0].shape == (PROBE_N, 128)
    np.testing.assert_allclose(np.linalg.norm(result.text_embeddings[1], axis=1), 1.0, atol=1e-5)
    assert result.cka_to_final("image")[-1] == pytest.approx(1.0)
    assert result.cka_to_final("visual.transformer.resblocks.0")[-1] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- agreement with open_clip


@pytest.fixture
def registered_demo_configs(tmp_path: Path) -> Any:
    """Register the demo model configs in open_clip's registry for one test, then put the registry back."""
    from open_clip import factory

    paths, configs = list(factory._MODEL_CONFIG_PATHS), dict(factory._MODEL_CONFIGS)
    open_clip.add_model_config(tj.write_model_configs(tmp_path / "model_configs"))
    yield
    factory._MODEL_CONFIG_PATHS[:] = paths
    factory._MODEL_CONFIGS.clear()
    factory._MODEL_CONFIGS.update(configs)


def test_zero_shot_equals_open_clip_on_the_same_checkpoint(
    ckpt_dir: Path, probe: Any, result: Any, registered_demo_configs: Any
) -> None:
    name = tj.model_name("tiny")
    tokenizer = open_clip.get_tokenizer(name)
    for i, path in enumerate(sorted(ckpt_dir.glob("epoch_*.pt"))):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
        model.eval()
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, probe.class_names, probe.templates)
        with torch.no_grad():
            images = torch.stack([preprocess(probe.image(k)) for k in range(len(probe))])
            feats = model.encode_image(images, normalize=True)
            logits = 100.0 * feats @ classifier
        target = torch.as_tensor(probe.labels)
        pred = logits.topk(5, dim=1).indices
        top1 = int((pred[:, 0] == target).sum()) / len(probe)
        top5 = int((pred == target[:, None]).any(dim=1).sum()) / len(probe)
        assert result.zero_shot["top1"][i] == pytest.approx(top1, abs=1e-12)
        assert result.zero_shot["top5"][i] == pytest.approx(top5, abs=1e-12)
        # Not only the same accuracy: the same embeddings, so the same model, weights and preprocessing.
        np.testing.assert_allclose(result.image_embeddings[i], feats.numpy(), atol=1e-5)


def test_retrieval_equals_what_open_clip_train_logged(ckpt_dir: Path) -> None:
    """open_clip_train evaluated each epoch on its val CSV (the first 256 training rows); the same CSV as a probe
    gives the same recall@k, exactly."""
    workdir = ckpt_dir.parents[2]
    val = folder_probe(workdir / "data" / "digits-head512.csv", root=workdir)
    traj = FileTrajectory(sorted(ckpt_dir.glob("epoch_*.pt")))
    got = analyze_representations(traj, val, blocks=False).to_dict()
    assert "zero_shot" not in got  # captions only: no labels
    for i, point in enumerate(traj.points):
        logged = point.metadata["metrics"]
        for direction in ("image_to_text", "text_to_image"):
            for k in ("R@1", "R@5", "R@10"):
                assert got["retrieval"][direction][k][i] == logged[f"{direction}_{k}"], (direction, k, i)


def test_store_run_gives_the_same_answers_as_the_files(tmp_path: Path, ckpt_dir: Path, probe: Any, result: Any) -> None:
    from ckptstore.integrations.openclip import ingest
    from ckptstore.store import open_store

    store = open_store(str(tmp_path / "store"), create=True)
    ingest(store, [ckpt_dir], run="tiny")
    from_store = analyze_representations(StoreTrajectory(store, "tiny"), probe).to_dict()
    from_files = result.to_dict()
    for d in (from_store, from_files):
        d.pop("seconds")
        for p in d["points"]:
            p.pop("label")
    assert from_store == from_files


# ------------------------------------------------------------------------------------------- probe variants


def test_probe_without_captions_embeds_the_class_prompts(ckpt_dir: Path, probe: Any) -> None:
    from dataclasses import replace

    no_caps = replace(probe.subset(range(40)), captions=None)
    traj = FileTrajectory([ckpt_dir / "epoch_2.pt"])
    res = analyze_representations(traj, no_caps, pooling="token")
    d = res.to_dict()
    assert "retrieval" not in d
    assert d["probe"]["n_texts"] == 0 and d["probe"]["texts"] == "prompts"
    assert len(d["zero_shot"]["top1"]) == 1
    assert d["cka"]["text"] == [[1.0]]
    assert res.text_embeddings[0].shape == (len(probe.class_names) * len(probe.templates), 128)
    # Token pooling reads the positions the model pools: the last block's class / end-of-text token, through the
    # final norm and projection, is the embedding.
    model = OpenClipRunner(traj).load(0)
    with torch.no_grad():
        img_tok = torch.from_numpy(res.block_activations["visual.transformer.resblocks.2"][0])
        img = model.visual.ln_post(img_tok) @ model.visual.proj
        txt_tok = torch.from_numpy(res.block_activations["transformer.resblocks.2"][0])
        txt = model.ln_final(txt_tok) @ model.text_projection
    np.testing.assert_allclose(torch.nn.functional.normalize(img, dim=-1), res.image_embeddings[0], atol=1e-5)
    np.testing.assert_allclose(torch.nn.functional.normalize(txt, dim=-1), res.text_embeddings[0], atol=1e-5)
    assert d["cka"]["blocks"]["visual.transformer.resblocks.0"] == [[1.0]]
    mean = analyze_representations(traj, no_caps.subset(range(10))).block_activations
    assert mean["transformer.resblocks.2"][0].shape == (len(no_caps.prompts()), 128)


def test_missing_model_config_and_wrong_weights_are_one_line_errors(ckpt_dir: Path, probe: Any) -> None:
    sd = FileTrajectory([ckpt_dir / "epoch_1.pt"]).state_dict(0)
    bare = MemoryTrajectory([sd])  # no metadata: nothing names the model
    with pytest.raises(CkptStoreError, match="model config"):
        analyze_representations(bare, probe)
    wrong = {**tj.tiny_model_config("small")}
    with pytest.raises(RepresentationError, match="do not fit"):
        analyze_representations(bare, probe, model_config=wrong, blocks=False)
    cfg = tj.tiny_model_config("tiny")
    got = analyze_representations(bare, probe.subset(range(20)), model_config=cfg, blocks=False)
    assert got.model["config_source"] == "given"


# ------------------------------------------------------------------------------------------------ measures


def test_effective_dimension_and_rank(rng: np.random.Generator) -> None:
    iso = rng.standard_normal((20000, 8))
    assert effective_dimension(iso) == pytest.approx(8, rel=0.02)
    assert effective_rank(iso) == pytest.approx(8, rel=0.02)
    line = np.outer(rng.standard_normal(100), rng.standard_normal(5))
    assert effective_dimension(line) == pytest.approx(1.0)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(effective_dimension(np.ones((5, 3))))
    # Two directions, one with 3x the spread: PR = (9 + 1)^2 / (81 + 1).
    two = np.hstack([3 * iso[:, :1], iso[:, 1:2]])
    assert effective_dimension(two) == pytest.approx(100 / 82, rel=0.03)


def test_retrieval_recall_counts_ties_as_hits() -> None:
    e = np.eye(4)
    r = retrieval_recall(e, e)
    assert r["image_to_text"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two identical captions
    r = retrieval_recall(dup, dup)
    assert r["image_to_text"]["R@1"] == 1.0
    shifted = np.roll(np.eye(5), 1, axis=0)  # every image's best text is the next one's
    assert retrieval_recall(np.eye(5), shifted)["image_to_text"]["R@1"] == 0.0
    with pytest.raises(RepresentationError):
        retrieval_recall(np.eye(3), np.eye(4)[:, :3])


def test_zero_shot_accuracy_top_k() -> None:
    classifier = np.eye(3)
    emb = np.array([[1.0, 0.5, 0.0], [0.0, 0.2, 1.0], [0.9, 1.0, 0.0]])
    acc = zero_shot_accuracy(emb, classifier, np.array([0, 1, 1]), ks=(1, 2, 5))
    assert acc == {"top1": pytest.approx(2 / 3), "top2": pytest.approx(1.0), "top5": 1.0}


# ---------------------------------------------------------------------------------------- any nn.Module


def test_generic_module_path() -> None:
    nn = torch.nn
    gen = torch.Generator().manual_seed(0)

    def factory() -> Any:
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    base = factory().state_dict()
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    rotated = dict(base)  # the last layer's outputs rotated: the same representation up to an orthogonal map
    rotated["2.weight"], rotated["2.bias"] = q @ base["2.weight"], q @ base["2.bias"]
    scaled = {k: (3.0 * v if k.startswith("2.") else v) for k, v in base.items()}
    other = factory().state_dict()
    traj = MemoryTrajectory([base, rotated, scaled, other])
    inputs = torch.randn(64, 6, generator=gen)
    calls = []
    res = analyze_module_representations(
        traj, factory, inputs, layers=["1"], batch_size=20, progress=lambda d, t: calls.append((d, t))
    )
    d = res.to_dict()
    out = np.asarray(d["cka"]["output"])
    assert out[0, 1] == pytest.approx(1.0) and out[0, 2] == pytest.approx(1.0)
    assert out[0, 3] < 0.99
    hidden = np.asarray(d["cka"]["layers"]["1"])
    assert hidden[0, 1] == pytest.approx(1.0) and hidden[0, 3] < 0.99  # layer "1" is the same in 0..2
    assert len(d["effective_dim"]["output"]) == 4 and d["effective_dim"]["layers"]["1"][0] > 1
    assert d["n_inputs"] == 64 and calls[-1] == (4, 4)
    # The outputs are the model's own outputs, batch by batch.
    model = factory()
    model.load_state_dict(other)
    np.testing.assert_allclose(res.outputs[3], model(inputs).detach().numpy(), atol=1e-6)
    with pytest.raises(RepresentationError, match="no layer"):
        analyze_module_representations(traj, factory, inputs, layers=["nope"])
    with pytest.raises(RepresentationError, match="do not fit"):
        analyze_module_representations(traj, lambda: nn.Linear(6, 4), inputs)
