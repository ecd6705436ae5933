"""Probe sets (digits, CSV folders) and the ``ckpt analyze representations`` / ``transfer`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptstore.analysis.probes import (
    DIGIT_TEMPLATES,
    ProbeError,
    ProbeSet,
    chance_accuracy,
    digits_probe,
    folder_probe,
    load_probe,
)
from ckptstore.errors import CkptStoreError

pytest.importorskip("PIL")
pytest.importorskip("sklearn")

from PIL import Image

# ------------------------------------------------------------------------------------------------- digits


def test_digits_probe() -> None:
    p = digits_probe(57, seed=3)
    assert len(p) == 57 and p.name == "digits-57-s3"
    assert p.class_names[:3] == ("zero", "one", "two") and p.templates == DIGIT_TEMPLATES
    counts = np.bincount(p.labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # balanced
    img = p.image(0)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert p.captions is not None and len(set(p.captions)) == 57  # every caption distinct, as in training
    for label, caption in zip(p.labels, p.captions, strict=True):
        assert p.class_names[label] in caption.split()[:7] or str(label) in caption.split()[:7]
    again = digits_probe(57, seed=3)
    assert np.array_equal(again.labels, p.labels) and again.captions == p.captions
    assert not np.array_equal(digits_probe(57, seed=4).labels, p.labels)
    assert digits_probe(10, captions=False).captions is None
    assert chance_accuracy(digits_probe(100)) == pytest.approx(0.1)
    with pytest.raises(ProbeError):
        digits_probe(0)


def test_digits_probe_pixels_are_the_demo_training_images(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    from ckptstore.demo.trajectory import write_digits_dataset

    csv_path = write_digits_dataset(tmp_path, n_images=30, words_per_caption=(0, 0))
    p = digits_probe(1797, captions=False)
    first = [line.split("\t")[0] for line in csv_path.read_text().splitlines()[1:]]
    for i in (0, 7, 29):  # the full probe holds every digit in index order
        assert np.array_equal(np.asarray(Image.open(first[i])), np.asarray(p.image(i)))


def test_probe_set_checks_its_fields() -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ProbeError, match="neither"):
        ProbeSet("x", [img])
    with pytest.raises(ProbeError, match="class_names"):
        ProbeSet("x", [img], labels=np.array([0]))
    with pytest.raises(ProbeError, match="outside"):
        ProbeSet("x", [img], labels=np.array([2]), class_names=("a", "b"))
    with pytest.raises(ProbeError, match="captions"):
        ProbeSet("x", [img, img], captions=("one",))
    with pytest.raises(ProbeError, match="template"):
        ProbeSet("x", [img], captions=("c",), templates=("no slot",))
    p = ProbeSet("x", [np.zeros((4, 4), np.uint8)], labels=np.array([1]), class_names=("a", "b"))
    assert p.image(0).mode == "RGB" and p.prompts()[:1] == ["a photo of a a."]
    assert issubclass(ProbeError, CkptStoreError) and issubclass(ProbeError, ValueError)


# ------------------------------------------------------------------------------------------------- folder


def _write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arr = np.full((6, 5, 3), 20 * i, np.uint8)
        arr[0, 0] = (255, 0, i)
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        out.append(path)
    return out


def test_folder_probe_round_trip(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs", 4)
    names = ["cat", "dog", "cat", "bird"]
    # A caption holding the separator is quoted, as csv writes it.
    rows = [
        f'imgs/{p.name},{n},"a picture of a {n}, number {i}"' for i, (p, n) in enumerate(zip(paths, names, strict=True))
    ]
    csv_path = tmp_path / "probe.csv"
    csv_path.write_text("image,label,caption\n" + "\n".join(rows) + "\n")
    p = folder_probe(csv_path)
    assert p.name == "probe" and len(p) == 4
    assert p.class_names == ("bird", "cat", "dog")  # named labels: sorted
    assert p.labels.tolist() == [1, 2, 1, 0]
    assert p.captions == tuple(f"a picture of a {n}, number {i}" for i, n in enumerate(names))
    for i, path in enumerate(paths):
        assert np.array_equal(np.asarray(p.image(i)), np.asarray(Image.open(path).convert("RGB")))
    assert p.sources[0] == str(tmp_path / "imgs" / "img0.png")
    ordered = folder_probe(csv_path, class_names=["dog", "cat", "bird"], templates=("a {}",))
    assert ordered.labels.tolist() == [1, 0, 1, 2] and ordered.prompts()[0] == "a dog"
    assert p.describe() == {"name": "probe", "n_images": 4, "n_texts": 4, "classes": ["bird", "cat", "dog"]}


def test_folder_probe_tab_separated_integer_labels_and_absolute_paths(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "a", 3)
    classes = tmp_path / "classes.txt"
    classes.write_text("zero\none\ntwo\n")
    csv_path = tmp_path / "sub" / "p.tsv"
    csv_path.parent.mkdir()
    csv_path.write_text("filepath\tlabel\n" + "".join(f"{p}\t{i}\n" for i, p in enumerate(paths)))
    p = folder_probe(csv_path, class_names=classes, name="mine")
    assert p.name == "mine" and p.class_names == ("zero", "one", "two") and p.labels.tolist() == [0, 1, 2]
    assert p.captions is None
    assert folder_probe(csv_path).class_names == ("0", "1", "2")
    assert len(load_probe(csv_path, n=2)) == 2
    # Captions only; relative to another root.
    cap = tmp_path / "caps.csv"
    cap.write_text("title,path\nhello,img1.png\n")
    q = folder_probe(cap, root=tmp_path / "a")
    assert q.labels is None and q.captions == ("hello",)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("image,label\nimgs/img0.png,0\nimgs/missing.png,1\n", r"row 3: .*missing.png: no such file"),
        ("image,label\nimgs/img0.png,0\nimgs/not_an_image.png,1\n", r"row 3: .*not a readable image"),
        ("image,label\nimgs/img0.png,0\nimgs/img1.png,\n", r"row 3: no label"),
        ("picture,label\nimgs/img0.png,0\n", r"no image column"),
        ("image,kind\nimgs/img0.png,0\n", r"no label or caption column"),
        ("image,label\n", r"no rows"),
        ("", r"empty"),
        ("image,label\nimgs/img0.png,0\nimgs/img1.png,dog\n", r"row 3: label 'dog' is not one of the class names"),
    ],
)
def test_folder_probe_errors_name_the_file_and_row(tmp_path: Path, body: str, match: str) -> None:
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "not_an_image.png").write_text("hello")
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(body)
    class_names = ["zero", "one"] if "dog" in body else None
    with pytest.raises(ProbeError, match=match) as info:
        folder_probe(csv_path, class_names=class_names)
    assert str(csv_path) in str(info.value)


def test_folder_probe_label_range_and_missing_file(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 1)
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("image,label\nimgs/img0.png,5\n")
    with pytest.raises(ProbeError, match=r"row 2: label 5 is outside 0..1"):
        folder_probe(csv_path, class_names=["a", "b"])
    with pytest.raises(ProbeError, match="cannot read"):
        folder_probe(tmp_path / "nope.csv")
    with pytest.raises(ProbeError, match="no probe file"):
        load_probe(tmp_path / "nope.csv")
    with pytest.raises(ProbeError, match="no column 'x'"):
        folder_probe(csv_path, label_column="x")


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def ckpt_dir() -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    pytest.importorskip("open_clip_train")
    from ckptstore.demo import trajectory as tj

    return tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)


@pytest.fixture(autouse=True)
def _threads() -> Any:
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _ckpt(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from ckptstore.cli.main import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_representations_json_and_out(ckpt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "rep.json"
    rc, out, _ = _ckpt(
        ["analyze", "representations", str(ckpt_dir), "--n", "30", "--no-blocks", "--json", "--out", str(out_file)],
        capsys,
    )
    assert rc == 0
    blob = json.loads(out)
    assert blob == json.loads(out_file.read_text())
    assert blob["probe"]["n_images"] == 30 and len(blob["points"]) == 2
    assert "blocks" not in blob["cka"] and set(blob["zero_shot"]) >= {"top1", "top5"}


def test_cli_representations_table_from_a_store(
    ckpt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    assert _ckpt(["init", "-s", store], capsys)[0] == 0
    assert _ckpt(["ingest", "-s", store, str(ckpt_dir), "--run", "tiny"], capsys)[0] == 0
    rc, out, _ = _ckpt(["analyze", "representations", "-s", store, "tiny", "--n", "20"], capsys)
    assert rc == 0
    assert "zero-shot" in out and "CKA" in out and "tiny@" in out
    assert "visual.transformer.resblocks.0" in out  # the per-block table


def test_cli_transfer(ckpt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(ckpt_dir / "epoch_1.pt"), str(ckpt_dir / "epoch_2.pt")]
    plot = tmp_path / "t.png"
    rc, out, _ = _ckpt(["analyze", "transfer", *files, "--n", "100", "--json", "--plot", str(plot)], capsys)
    assert rc == 0 and plot.is_file()
    blob = json.loads(out)
    assert blob["dataset"]["n_train"] + blob["dataset"]["n_test"] == 100
    assert all(a > 0.3 for a in blob["accuracy"])
    rc, out, _ = _ckpt(["analyze", "transfer", files[1], "--n", "60"], capsys)
    assert rc == 0 and "best" in out and "test acc" in out


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    rc, _, err = _ckpt(["analyze", "representations", "-s", str(tmp_path / "nostore"), "somerun"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("ckpt analyze representations: error:")
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"")
    rc, _, err = _ckpt(["analyze", "transfer", str(pt), "--probe", str(tmp_path / "none.csv")], capsys)
    assert rc == 2 and err.count("\n") == 1
