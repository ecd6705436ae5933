"""Tags and notes after the fact: ``ckpt tag/untag/note`` rewrite only the checkpoint's manifest; the tensors
(pack files) are not touched and every checkpoint still loads bit-exactly."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore import metadata as md
from ckptstore.cli.main import main as ckpt_main


def ckpt(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[int, np.ndarray]]:
    path = tmp_path / "s"
    s = ckptstore.create_store(path)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(2000).astype(np.float32)
    states = {}
    for step in (10, 20, 30):
        w = w + rng.standard_normal(2000).astype(np.float32) * 1e-3
        states[step] = w.copy()
        s.save("r", step, {"w": w}, {"epoch": step // 10, "metrics": {"acc": step / 100}})
    return path, states


def _packs(snapshot: Any, path: Path) -> dict[str, Any]:
    return {k: v for k, v in snapshot(path).items() if k.startswith("packs/")}


def test_tag_untag_note_touch_only_manifests(store: tuple[Path, dict[int, np.ndarray]], snapshot: Any) -> None:
    path, states = store
    s = str(path)
    packs_before, all_before = _packs(snapshot, path), snapshot(path)

    rc, out, err = ckpt("tag", "r@epoch=2", "release", "best", "--store", s)
    assert rc == 0, err
    assert out.strip() == "r@20: tags release, best"
    rc, out, _ = ckpt("tag", "r@20", "best", "extra", "--store", s, "--json")  # existing tags are not doubled
    assert json.loads(out) == {"ref": "r@20", "tags": ["release", "best", "extra"], "notes": None}
    rc, out, _ = ckpt("untag", "r@20", "extra", "nope", "--store", s, "--json")
    assert json.loads(out)["tags"] == ["release", "best"]
    rc, _, _ = ckpt("note", "r@tag:release", "shipped to the model zoo", "--store", s)
    rc, _, _ = ckpt("note", "r@tag:release", "-a", "second line", "--store", s)
    rc, out, _ = ckpt("show", "r@tag:best", "--store", s, "--json")
    meta = json.loads(out)["metadata"]
    assert meta == {"epoch": 2, "metrics": {"acc": 0.2}, "tags": ["release", "best"],
                    "notes": "shipped to the model zoo\nsecond line"}  # fmt: skip

    after = snapshot(path)
    assert _packs(snapshot, path) == packs_before, "a metadata edit rewrote tensor data"
    changed = {k for k in set(after) | set(all_before) if after.get(k) != all_before.get(k)}
    assert changed == {"runs/r/ckpt/00000000000000000020.json"}
    fresh = ckptstore.open_store(path)
    for step, w in states.items():
        assert fresh.load(f"r@{step}")["w"].tobytes() == w.tobytes()
    assert fresh.verify()["ok"]

    rc, _, _ = ckpt("note", "r@20", "--clear", "--store", s)
    rc, _, _ = ckpt("untag", "r@20", "release", "best", "--store", s)
    assert ckptstore.open_store(path).resolve("r@20").metadata == {"epoch": 2, "metrics": {"acc": 0.2}}


def test_note_from_stdin_and_move_tag(
    store: tuple[Path, dict[int, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = store
    s = str(path)
    monkeypatch.setattr("sys.stdin", io.StringIO("from\nstdin\n"))
    rc, _, err = ckpt("note", "r@10", "-", "--store", s)
    assert rc == 0, err
    assert ckptstore.open_store(path).resolve("r@10").metadata["notes"] == "from\nstdin"
    ckpt("tag", "r@10", "champion", "--store", s)
    ckpt("tag", "r@30", "champion", "--move", "--store", s)
    fresh = ckptstore.open_store(path)
    assert fresh.resolve("r@tag:champion").step == 30
    assert "tags" not in fresh.resolve("r@10").metadata


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (("tag", "r@10", "has space"), "metadata field 'tags': invalid tag 'has space'"),
        (("tag", "r@10", "x" * 129), "invalid tag"),
        (("note", "r@10", "x" * (md.MAX_NOTES_BYTES + 1)), f"metadata field 'notes': {md.MAX_NOTES_BYTES + 1} bytes"),
        (("tag", "r@99", "ok"), "no checkpoint at step 99"),
    ],
)
def test_bad_edits_are_one_clear_error(store: tuple[Path, dict[int, np.ndarray]], snapshot: Any,
                                       argv: tuple[str, ...], phrase: str) -> None:  # fmt: skip
    path, _ = store
    before = snapshot(path)
    rc, out, err = ckpt(*argv, "--store", str(path))
    assert rc == 2 and out == ""
    assert phrase in err and err.startswith(f"ckpt {argv[0]}: error:")
    assert snapshot(path) == before


def test_python_helpers(store: tuple[Path, dict[int, np.ndarray]]) -> None:
    path, _ = store
    s = ckptstore.open_store(path)
    m = md.add_tags(s, "r@latest", ["a", "b", "a"])
    assert m.metadata["tags"] == ["a", "b"]
    assert md.remove_tags(s, "r@30", ["a"]).metadata["tags"] == ["b"]
    assert md.set_notes(s, "r@30", "one").metadata["notes"] == "one"
    assert md.set_notes(s, "r@30", "two", append=True).metadata["notes"] == "one\ntwo"
    assert "notes" not in md.set_notes(s, "r@30", None).metadata
    assert ckptstore.open_store(path).resolve("r@tag:b").step == 30
