"""``ckpt release`` end to end on a real OpenCLIP run: a tiny 2-epoch ``open_clip_train`` run on 256 digits (the
shared trajectory cache, so other test modules reuse it), ingested, released through the CLI; every released
folder loads in OpenCLIP with ``local-dir:`` and its tensors are bit-identical to the stored checkpoint and to
the trainer's own ``epoch_N.pt``; the model card renders to HTML with its table and image; the checksums hold;
the released compact store opens read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

torch = importlib.import_module("torch")
open_clip = importlib.import_module("open_clip")
importlib.import_module("open_clip_train")
importlib.import_module("sklearn")
importlib.import_module("pandas")
importlib.import_module("safetensors")
importlib.import_module("matplotlib")

from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.release import ReleaseError, evenly_spaced, release, resolve_model_config  # noqa: E402
from ckptstore.storage.readonly import ReadOnlyStoreError  # noqa: E402
from ckptstore.store import create_store, open_store  # noqa: E402
from ckptstore.torch import same_bits  # noqa: E402

pytestmark = pytest.mark.slow

RUN = "tiny-csv-e2-s0"
FOLDERS = ["epoch-01-step-4", "epoch-02-step-8"]


def ckpt(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue()


def load_pt(path: Path) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(obj, dict)
    return obj


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained() -> Path:
    """The checkpoints folder of the shared tiny run (trained once, then cached for every test session)."""
    ckpts = tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)
    assert ckpts.parent.name == RUN
    return ckpts


@pytest.fixture(scope="module")
def store(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "ckpt.store"
    rc, out = ckpt("ingest", str(trained), "--store", str(path), "--init", "--json")
    assert rc == 0, out
    return path


@pytest.fixture(scope="module")
def released(store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("release") / "tiny-release"
    rc, text = ckpt("release", RUN, "--store", str(store), "--select", "2", "--out", str(out), "--as-store", "--json")
    assert rc == 0, text
    return out, json.loads(text)


# ------------------------------------------------------------------------------------------------ tests


def test_layout(released: tuple[Path, dict[str, Any]]) -> None:
    out, info = released
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*FOLDERS, "README.md", "metrics.png", "release.json", "SHA256SUMS", "store"]
    )
    for f in FOLDERS:
        assert sorted(p.name for p in (out / f).iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
        cfg = json.loads((out / f / "open_clip_config.json").read_text())
        assert set(cfg) == {"model_cfg", "preprocess_cfg"}
        assert cfg["model_cfg"] == tj.tiny_model_config("tiny")  # found via the run's model_configs/ folder
    assert json.loads((out / "release.json").read_text()) == info
    assert [c["folder"] for c in info["checkpoints"]] == FOLDERS
    assert [c["reason"] for c in info["checkpoints"]] == ["first checkpoint", "last checkpoint"]
    assert info["model"] == tj.model_name("tiny")
    assert all(c["metrics"] for c in info["checkpoints"]), "results.jsonl metrics reach the release"


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_loads_in_open_clip_bit_exact(
    folder: str, released: tuple[Path, dict[str, Any]], store: Path, trained: Path
) -> None:
    out, info = released
    row = next(c for c in info["checkpoints"] if c["folder"] == folder)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out / folder}")
    assert tokenizer(["a photo of the digit one"]).shape == (1, tj.CONTEXT_LENGTH)
    got = model.state_dict()
    stored = open_store(store).load(row["ref"], tensors="torch")["state_dict"]
    original = load_pt(trained / f"epoch_{row['epoch']}.pt")["state_dict"]
    want = {k.removeprefix("module."): v for k, v in stored.items()}
    assert list(got) == list(want)
    for k, v in want.items():
        assert same_bits(got[k], v), k
        assert same_bits(v, original[k] if k in original else original[f"module.{k}"]), k
    with torch.no_grad():  # and it runs
        image = preprocess(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32)))[None]
        feats = model.encode_image(image)
    assert feats.shape == (1, tj.tiny_model_config("tiny")["embed_dim"])


def test_model_card_renders_with_table_and_image(released: tuple[Path, dict[str, Any]]) -> None:
    yaml = importlib.import_module("yaml")  # PyYAML and markdown-it-py come with the dev requirements (moto, rich)
    MarkdownIt = importlib.import_module("markdown_it").MarkdownIt

    out, info = released
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "open_clip" and "ckptstore" in meta["tags"] and meta["license"] == "other"
    html = MarkdownIt("commonmark").enable("table").render(body)
    assert html.count("<table>") == 2  # the checkpoints and the training settings
    checkpoints_table = html.split("<table>")[1]
    rows = checkpoints_table.split("<tbody>")[1].count("<tr>")
    assert rows == len(FOLDERS)
    for header in ("Epoch", "Step", "Samples seen", "Why chosen", "Size", "SHA-256 of the weights"):
        assert f"<th>{header}</th>" in checkpoints_table or f'">{header}</th>' in checkpoints_table, header
    for c in info["checkpoints"]:
        assert f'<a href="{c["folder"]}/"><code>{c["folder"]}</code></a>' in checkpoints_table
        weights = next(f for f in c["files"] if f["path"].endswith(".safetensors"))
        assert weights["sha256"] in checkpoints_table
        assert c["reason"] in checkpoints_table
    assert '<img src="metrics.png"' in html
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "local-dir:./epoch-02-step-8" in html
    assert 'storage_options={"read_only": True}' in html.replace("&quot;", '"')


def test_checksums(released: tuple[Path, dict[str, Any]]) -> None:
    out, info = released
    records = [f for c in info["checkpoints"] for f in c["files"]] + info["files"]
    for f in records:
        p = out / f["path"]
        assert p.stat().st_size == f["bytes"] and sha256(p) == f["sha256"], f["path"]
    lines = (out / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == len(records) + 1  # + release.json
    for line in lines:
        digest, name = line.split("  ", 1)
        assert sha256(out / name) == digest, name


def test_released_store_opens_read_only(
    released: tuple[Path, dict[str, Any]], store: Path, assert_same_state: Any
) -> None:
    out, info = released
    ro = open_store(out / "store", storage_options={"read_only": True})
    original = open_store(store)
    assert ro.steps(RUN) == original.steps(RUN) == info["store"]["steps"]
    for s in ro.steps(RUN):
        assert_same_state(ro.load(f"{RUN}@{s}"), original.load(f"{RUN}@{s}"))
    assert ro.verify()["ok"]
    with pytest.raises(ReadOnlyStoreError):
        ro.delete([f"{RUN}@1"])
    with pytest.raises(PermissionError):
        ro.save(RUN, 99, {"x": torch.zeros(1)})
    rc, text = ckpt("ls", "--store", str(out / "store"), "-o", "read_only=true", "--json")
    assert rc == 0 and len(json.loads(text)) == 2, text
    assert info["store"]["bytes"] < info["store"]["logical_bytes"]


def test_refs_with_training_state(store: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "rel"
    rc, text = ckpt("release", RUN, "--store", str(store), "--refs", "epoch=1", "--training-state", "--out", str(out),
                    "--json")  # fmt: skip
    assert rc == 0, text
    info = json.loads(text)
    assert [c["folder"] for c in info["checkpoints"]] == ["epoch-01-step-4"]
    assert info["checkpoints"][0]["reason"] == "requested (epoch=1)"
    folder = out / "epoch-01-step-4"
    pt = load_pt(folder / "epoch_1.pt")
    original = load_pt(trained / "epoch_1.pt")
    assert list(pt) == list(original)
    for group in ("state_dict",):
        for k, v in original[group].items():
            assert same_bits(pt[group][k], v), k
    assert pt["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for i, st in original["optimizer"]["state"].items():
        for k, v in st.items():
            assert same_bits(pt["optimizer"]["state"][i][k], v), (i, k)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")  # the .pt does not confuse it
    assert same_bits(model.state_dict()["logit_scale"], original["state_dict"]["logit_scale"])
    # the folder exists now: a second release there is refused, --force replaces it
    rc, _ = ckpt("release", RUN, "--store", str(store), "--refs", "2", "--out", str(out))
    assert rc == 2
    rc, _ = ckpt("release", RUN, "--store", str(store), "--refs", "2", "--out", str(out), "--force")
    assert rc == 0 and sorted(p.name for p in out.iterdir() if p.is_dir()) == ["epoch-02-step-8"]
    assert not list(tmp_path.glob(".rel.partial-*"))


# ------------------------------------------------------------------------------------------------ units


def test_evenly_spaced() -> None:
    steps = list(range(0, 101, 10))
    assert evenly_spaced(steps, 1) == [(100, "last checkpoint")]
    assert [s for s, _ in evenly_spaced(steps, 3)] == [0, 50, 100]
    assert [s for s, _ in evenly_spaced(steps, 20)] == steps
    picks = evenly_spaced([1, 2, 3, 4, 1000], 4)  # crowded steps: still 4 distinct checkpoints
    chosen = [s for s, _ in picks]
    assert len(set(chosen)) == 4 and chosen[0] == 1 and chosen[-1] == 1000 and chosen == sorted(chosen)
    assert picks[0][1] == "first checkpoint" and picks[-1][1] == "last checkpoint"
    assert "evenly spaced" in picks[1][1]
    assert evenly_spaced([], 3) == []


def test_model_config_sources(tmp_path: Path) -> None:
    cfg, source = resolve_model_config({"hparams": {"model": "ViT-B-32"}})
    assert source == "open_clip.get_model_config('ViT-B-32')" and cfg["vision_cfg"]["patch_size"] == 32
    given = tj.tiny_model_config("tiny")
    (tmp_path / "cfg.json").write_text(json.dumps({"model_cfg": given, "preprocess_cfg": {}}))
    assert resolve_model_config({"model": "nope"}, tmp_path / "cfg.json")[0] == given
    assert resolve_model_config({"model_config": given})[0] == given
    with pytest.raises(ReleaseError) as ei:
        resolve_model_config({"model": "not-a-registered-model"}, ref="r@1")
    assert "--model-config" in str(ei.value)


def test_release_without_model_config_is_a_clear_error(tmp_path: Path) -> None:
    s = create_store(tmp_path / "s")
    s.save("r", 1, {"state_dict": {"w": torch.zeros(2)}}, {"model": "unknown-model"})
    with pytest.raises(ReleaseError) as ei:
        release(s, "r", tmp_path / "out", select=1)
    assert "not in open_clip's registry" in str(ei.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    with pytest.raises(ReleaseError):
        release(s, "r", tmp_path / "out")  # nothing asked for


def test_select_uses_key_checkpoint_selection(tmp_path: Path) -> None:
    from ckptstore.release import select_checkpoints

    s = create_store(tmp_path / "s")
    w = torch.zeros(1000)
    for step in range(0, 1100, 100):
        w = w + (1.0 if step < 300 else 0.05)  # fast early, slow late
        s.save("r", step, {"state_dict": {"w": w.clone()}}, {"metrics": {"val_loss": 1.0 / (1 + step)}})
    chosen, method = select_checkpoints(s, "r", 4)
    steps = [c.manifest.step for c in chosen]
    assert len(set(steps)) == 4 and steps[0] == 0 and steps[-1] == 1000 and steps == sorted(steps)
    assert chosen[0].reason == "first checkpoint" and chosen[-1].reason == "last checkpoint"
    assert all(c.reason for c in chosen) and "ckptstore.policy" in method
    assert [c.manifest.step for c in select_checkpoints(s, "r", 1)[0]] == [1000]
