"""DCP checkpoint folders (torch's ``FileSystemWriter``: ``.metadata`` + ``__N_0.distcp``) in and out of the store,
with folders written by real gloo ranks: ``ckpt ingest DIR`` (plain and ``ZStandard``-compressed folders, 4 and
3 writers), bit-exact against the original state; ``ckpt export --format dcp`` read back by plain
``FileSystemReader`` on 1 and 2 ranks; a forged ``.metadata`` (a pickle calling ``os.system``), a truncated one
and a cut ``.distcp`` are refused with one line, and the store stays as it was."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _worker import clip_state
from test_dcp import ranks
from test_full_tensors import same_state

from ckptstore.store import create_store, open_store


def ckpt(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptstore.cli", *argv], capture_output=True, text=True, timeout=300)


def ckpt_here(capsys: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """``ckpt`` in this process (the same parser, command and error handling), as :func:`ckpt` reports it: the
    refusals need no fresh interpreter importing torch each time."""
    from ckptstore.cli.main import main

    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out, err)


def tree_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training job's DCP folders: step 1 by 4 ranks (rows), step 2 by 4 ranks with ZStandard, step 3 by 3 ranks
    sharded by columns."""
    root = tmp_path_factory.mktemp("job") / "clip"
    root.mkdir()
    ranks(str(root), "4:fs_save:1:a", "4:fs_zsave:2:a", "3:fs_save:3:b")
    return root


def test_ingest_export_and_plain_dcp_load(job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(p.name for p in (job / "step_1").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"
    ]  # fmt: skip
    store_path = str(tmp_path / "store")
    r = ckpt("ingest", "-s", store_path, "--init", str(job / "step_1"), str(job / "step_2"), str(job / "step_3"),
             "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["ref"] for row in rows] == ["clip@1", "clip@2", "clip@3"]  # run: the folders' parent
    store = open_store(store_path)
    assert store.verify()["ok"]
    for s in (1, 2, 3):
        same_state(store.load(f"clip@{s}", tensors="torch"), clip_state(s))
    m1, m2 = store.manifest("clip", 1), store.manifest("clip", 2)
    assert len(m1.data["packs"]) == 4  # one pack per .distcp file (per writing rank)
    shard = "state_dict/token_embedding.weight/@0,0"
    assert m2.objects[m2.tensors[shard]["object"]]["refs"]["prev"] == m1.tensors[shard]["object"]  # delta-coded
    assert m2.info().stored_bytes < m1.info().stored_bytes

    r = ckpt_here(capsys, "ingest", "-s", store_path, str(job / "step_2"))  # already there: a clear error
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    for s in (2, 3):  # export the folder-ingested checkpoint 2 and 3, then plain DCP reads it, resharded
        out = job / f"export_{s}"
        r = ckpt("export", "-s", store_path, f"clip@{s}", "--format", "dcp", "-O", str(out), "--json")
        assert r.returncode == 0, r.stderr
        assert (out / ".metadata").is_file() and not out.with_name(out.name + ".partial").exists()
    ranks(str(job), "1:fs_load:2:a", "2:fs_load:2:b", "2:fs_load:3:a")
    r = ckpt_here(capsys, "export", "-s", store_path, "clip@2", "--format", "dcp", "-O", str(job / "export_2"))
    assert r.returncode == 2 and "already exists" in r.stderr  # never into an existing folder


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_hostile_and_damaged_folders_are_refused(job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_path = tmp_path / "store"
    create_store(store_path)
    r = ckpt_here(capsys, "ingest", "-s", str(store_path), str(job / "step_1"), "--run", "base")
    assert r.returncode == 0, r.stderr
    before = tree_files(store_path)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "step_7"
    shutil.copytree(job / "step_1", evil)
    (evil / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    r = ckpt_here(capsys, "ingest", "-s", str(store_path), str(evil), "--run", "base")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and ".metadata" in r.stderr and "system" in r.stderr, r.stderr
    assert not marker.exists()  # refused unread: os.system never ran
    assert tree_files(store_path) == before

    new_store = tmp_path / "new-store"  # --init: a refused first ingest leaves no store behind
    r = ckpt_here(capsys, "ingest", "-s", str(new_store), "--init", str(evil), "--run", "base")
    assert r.returncode == 2 and not new_store.exists() and not marker.exists()

    cut = tmp_path / "cut" / "step_8"
    shutil.copytree(job / "step_1", cut)
    raw = (job / "step_1" / ".metadata").read_bytes()
    (cut / ".metadata").write_bytes(raw[: len(raw) // 2])
    r = ckpt_here(capsys, "ingest", "-s", str(store_path), str(cut), "--run", "base")
    assert r.returncode == 2 and "cannot read DCP metadata" in r.stderr, r.stderr
    assert tree_files(store_path) == before

    shutil.copy(job / "step_1" / ".metadata", cut / ".metadata")
    data = cut / "__2_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # rank 2's file cut: ranks 0, 1 already stored
    r = ckpt_here(capsys, "ingest", "-s", str(store_path), str(cut), "--run", "base")
    assert r.returncode == 2 and "__2_0.distcp" in r.stderr, r.stderr
    assert tree_files(store_path) == before  # the packs of ranks 0 and 1 were freed again
    assert open_store(store_path).steps("base") == [1]
