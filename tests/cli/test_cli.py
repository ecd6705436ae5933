"""The ``ckpt`` command line: init, ls, show, rm, gc, verify, du — human and --json output, one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.cli.main import EXIT_ERROR, build_parser, main

CkptRunner = Callable[..., tuple[int, str, str]]
COMMANDS = ["init", "ls", "show", "rm", "gc", "verify", "du", "ingest", "export"]


@pytest.fixture
def ckpt(capsys: pytest.CaptureFixture[str]) -> CkptRunner:
    def run(*argv: Any) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _state(i: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(3000).astype(np.float32)
    w[:: 7 + i] = np.nextafter(w[:: 7 + i], np.float32(1))
    return {"w": w, "b": np.arange(100, dtype=np.int64) + i, "lr": 0.1 * i, "nested": {"t": np.ones(4) * i}}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Two runs: 'alpha' (4 checkpoints, epochs 0..3) and 'beta' (1 checkpoint, no epoch)."""
    path = tmp_path / "store"
    s = ckptstore.create_store(path)
    for i in range(4):
        s.save("alpha", 100 * i, _state(i), {"epoch": i, "metrics": {"val_loss": 1.0 / (i + 1)}})
    s.save("beta", 7, {"x": np.zeros(10)})
    return path


def _one_line_error(rc: int, err: str, command: str) -> str:
    assert rc == EXIT_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ckpt {command}: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- help
def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out
    assert "RUN@STEP" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main([command, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"ckpt {command}" in out
    assert "--store" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "ckpt: error: the following arguments are required: COMMAND (see `ckpt --help`)"
    )


def test_parser_builds() -> None:
    assert build_parser().prog == "ckpt"


# ---------------------------------------------------------------------------------------------- init
def test_init(tmp_path: Path, ckpt: CkptRunner) -> None:
    rc, out, err = ckpt("init", "--store", tmp_path / "s")
    assert rc == 0, err
    assert "created store" in out
    assert ckptstore.open_store(tmp_path / "s").runs() == []
    rc, _, err = ckpt("init", "--store", tmp_path / "s")
    _one_line_error(rc, err, "init")


def test_init_hot_then_compact(tmp_path: Path, ckpt: CkptRunner) -> None:
    path = tmp_path / "s"
    rc, out, err = ckpt("init", "--store", path, "--layout", "hot", "--json")
    assert rc == 0, err
    assert json.loads(out)["settings"]["layout"] == "hot"
    store = ckptstore.open_store(path, compaction="manual")
    for i in range(4):
        store.save("alpha", i, _state(i))
    store.close()
    rc, out, err = ckpt("compact", "alpha", "--store", path, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["compacted"] == ["alpha@0", "alpha@1", "alpha@2"] and res["logical_bytes"] > 0
    assert res["bytes_per_second"] > 0 and res["freed_bytes"] > 0
    rc, out, err = ckpt("compact", "alpha", "--store", path, "--newest")
    assert rc == 0, err
    assert out.startswith("compacted 1 checkpoint(s)"), out
    fresh = ckptstore.open_store(path)
    assert all(fresh.manifest("alpha", i).data.get("layout") is None for i in range(4))
    for i in range(4):
        assert fresh.load(f"alpha@{i}")["w"].tobytes() == _state(i)["w"].tobytes()
    rc, out, _ = ckpt("compact", "alpha", "--store", path, "--json")
    assert rc == 0 and json.loads(out)["compacted"] == []
    rc, _, err = ckpt("compact", "nosuchrun", "--store", path)
    assert "no run 'nosuchrun'" in _one_line_error(rc, err, "compact")
    with pytest.raises(SystemExit) as exc:
        ckpt("init", "--store", tmp_path / "t", "--layout", "warm")
    assert exc.value.code == EXIT_ERROR and not (tmp_path / "t").exists()


def test_init_on_non_empty_dir(tmp_path: Path, ckpt: CkptRunner) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    rc, _, err = ckpt("init", "--store", tmp_path / "d")
    line = _one_line_error(rc, err, "init")
    assert "not empty" in line
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["notes.txt"]


def test_store_from_environment(tmp_path: Path, ckpt: CkptRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_STORE", str(tmp_path / "envstore"))
    from ckptstore.cli import main as main_mod  # the default is read when the parser is built

    assert main_mod.build_parser().parse_args(["ls"]).store == str(tmp_path / "envstore")
    rc, _, err = ckpt("init")
    assert rc == 0, err
    assert (tmp_path / "envstore" / "ckptstore.json").exists()
    rc, out, _ = ckpt("ls", "--json")
    assert rc == 0 and json.loads(out) == []


# ---------------------------------------------------------------------------------------------- ls
def test_ls_json(store: Path, ckpt: CkptRunner) -> None:
    rc, out, err = ckpt("ls", "--store", store, "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["ref"] for r in rows] == ["alpha@0", "alpha@100", "alpha@200", "alpha@300", "beta@7"]
    infos = {i.ref: i for i in ckptstore.open_store(store).checkpoints()}
    for r in rows:
        for field in ("ref", "epoch", "step", "logical_bytes", "stored_bytes", "ratio"):
            assert field in r, field
        info = infos[r["ref"]]
        assert r["step"] == info.step
        assert r["logical_bytes"] == info.logical_bytes > 0
        assert r["stored_bytes"] == info.stored_bytes > 0
        assert r["ratio"] == pytest.approx(r["logical_bytes"] / r["stored_bytes"], rel=1e-3)
        assert isinstance(r["step"], int) and isinstance(r["logical_bytes"], int)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, None]
    rc, out, _ = ckpt("ls", "--store", store, "alpha", "--json")
    assert [r["ref"] for r in json.loads(out)] == ["alpha@0", "alpha@100", "alpha@200", "alpha@300"]
    rc, out, err = ckpt("ls", "--store", store, "nothing", "--json")
    assert "no run 'nothing'" in _one_line_error(rc, err, "ls") and out == ""


def test_ls_table(store: Path, ckpt: CkptRunner) -> None:
    rc, out, err = ckpt("ls", "--store", store)
    assert rc == 0, err
    for word in ("ref", "epoch", "step", "logical", "stored", "ratio", "alpha@0", "alpha@300", "beta@7", "total"):
        assert word in out, word
    rc, out, _ = ckpt("ls", "--store", store, "beta")
    assert "beta@7" in out and "alpha" not in out


def test_ls_empty_store(tmp_path: Path, ckpt: CkptRunner) -> None:
    ckptstore.create_store(tmp_path / "s")
    rc, out, _ = ckpt("ls", "--store", tmp_path / "s", "--json")
    assert rc == 0 and json.loads(out) == []
    rc, out, _ = ckpt("ls", "--store", tmp_path / "s")
    assert rc == 0


def test_ls_missing_store(tmp_path: Path, ckpt: CkptRunner) -> None:
    rc, _, err = ckpt("ls", "--store", tmp_path / "nothing")
    line = _one_line_error(rc, err, "ls")
    assert str(tmp_path / "nothing") in line and "ckpt init" in line


def test_ls_bad_run_name(store: Path, ckpt: CkptRunner) -> None:
    rc, _, err = ckpt("ls", "--store", store, "../etc")
    _one_line_error(rc, err, "ls")


# ---------------------------------------------------------------------------------------------- show
def test_show_json(store: Path, ckpt: CkptRunner) -> None:
    rc, out, err = ckpt("show", "--store", store, "alpha@epoch=2", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["ref"] == "alpha@200" and d["run"] == "alpha" and d["step"] == 200
    assert d["metadata"]["epoch"] == 2
    assert d["tensors"] == 3
    names = {t["name"]: t for t in d["tensor_list"]}
    assert set(names) == {"w", "b", "nested/t"}
    assert names["w"]["dtype"] == "float32" and names["w"]["shape"] == [3000]
    assert names["b"]["dtype"] == "int64"
    for t in d["tensor_list"]:
        assert t["codecs"] and t["stored_bytes"] >= 0 and t["object"].startswith("xxh128:")
    assert names["w"]["delta_of"] is not None  # epoch 2 is a delta against epoch 1
    info = {i.ref: i for i in ckptstore.open_store(store).checkpoints("alpha")}["alpha@200"]
    assert d["logical_bytes"] == info.logical_bytes and d["stored_bytes"] == info.stored_bytes


@pytest.mark.parametrize(
    ("ref", "step"),
    [("alpha", 300), ("alpha@first", 0), ("alpha@100", 100), ("alpha@best:val_loss", 300), ("beta@latest", 7)],
)
def test_show_resolves_references(store: Path, ckpt: CkptRunner, ref: str, step: int) -> None:
    rc, out, _ = ckpt("show", "--store", store, ref, "--json")
    assert rc == 0 and json.loads(out)["step"] == step


def test_show_human(store: Path, ckpt: CkptRunner) -> None:
    rc, out, _ = ckpt("show", "--store", store, "alpha@100", "--tensors")
    assert rc == 0
    assert "alpha@100" in out and "3 tensors" in out and "epoch: 1" in out
    for name in ("w", "b", "nested/t", "float32", "int64"):
        assert name in out


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("alpha@5", "alpha@5"),
        ("gamma", "gamma"),
        ("alpha@", "alpha@"),
        ("alpha@tag:none", "none"),
        ("alpha@epoch=99", "99"),
    ],
)
def test_show_errors(store: Path, ckpt: CkptRunner, ref: str, fragment: str) -> None:
    rc, _, err = ckpt("show", "--store", store, ref)
    line = _one_line_error(rc, err, "show")
    assert fragment in line


# ---------------------------------------------------------------------------------------------- rm
def test_rm_json(store: Path, ckpt: CkptRunner, snapshot: Any) -> None:
    before = {s: ckptstore.open_store(store).load(f"alpha@{s}") for s in (0, 200, 300)}
    rc, out, err = ckpt("rm", "--store", store, "alpha@100", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["deleted"] == ["alpha@100"]
    assert isinstance(res["rewritten"], int) and res["freed_bytes"] >= 0
    s = ckptstore.open_store(store)
    assert s.steps("alpha") == [0, 200, 300]
    for step, state in before.items():
        got = s.load(f"alpha@{step}")
        assert got["w"].tobytes() == state["w"].tobytes() and got["b"].tobytes() == state["b"].tobytes()
    assert s.verify()["ok"]


def test_rm_human_and_several(store: Path, ckpt: CkptRunner) -> None:
    rc, out, _ = ckpt("rm", "--store", store, "alpha@first", "beta@7")
    assert rc == 0
    assert "alpha@0" in out and "beta@7" in out and "deleted" in out
    assert ckptstore.open_store(store).runs() == ["alpha"]


def test_rm_missing_changes_nothing(store: Path, ckpt: CkptRunner, snapshot: Any) -> None:
    before = snapshot(store)
    rc, _, err = ckpt("rm", "--store", store, "alpha@100", "alpha@999")
    line = _one_line_error(rc, err, "rm")
    assert "999" in line
    assert snapshot(store) == before


# ---------------------------------------------------------------------------------------------- gc
def test_gc_json(store: Path, ckpt: CkptRunner) -> None:
    rc, out, _ = ckpt("gc", "--store", store, "--json")
    assert rc == 0 and json.loads(out) == {"removed_packs": 0, "freed_bytes": 0}
    packs = sorted((store / "packs").rglob("*.pack"))
    orphan = store / "packs" / "alpha" / "00000000000000099999-0123456789ab.pack"
    shutil.copy(packs[0], orphan)
    size = orphan.stat().st_size
    rc, out, _ = ckpt("gc", "--store", store, "--json")
    assert rc == 0 and json.loads(out) == {"removed_packs": 1, "freed_bytes": size}
    assert not orphan.exists() and all(p.exists() for p in packs)
    rc, out, _ = ckpt("gc", "--store", store)
    assert rc == 0 and "removed 0" in out


# ---------------------------------------------------------------------------------------------- verify
def test_verify(store: Path, ckpt: CkptRunner) -> None:
    rc, out, _ = ckpt("verify", "--store", store, "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["ok"] is True and res["problems"] == [] and res["checkpoints"] == 5 and res["objects"] > 0
    rc, out, _ = ckpt("verify", "--store", store)
    assert rc == 0 and "OK" in out and "5 checkpoints" in out
    rc, out, _ = ckpt("verify", "--store", store, "beta", "--json")
    assert rc == 0 and json.loads(out)["checkpoints"] == 1


def test_verify_damaged(store: Path, ckpt: CkptRunner) -> None:
    s = ckptstore.open_store(store)
    m = s.resolve("alpha@0")
    rec = m.objects[m.tensors["w"]["object"]]
    pack = store / rec["pack"]
    data = bytearray(pack.read_bytes())
    data[rec["offset"] + rec["length"] // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    rc, out, _ = ckpt("verify", "--store", store, "--json")
    assert rc == 1
    res = json.loads(out)
    assert res["ok"] is False and res["problems"]
    assert any("alpha@0" in p for p in res["problems"])
    rc, out, _ = ckpt("verify", "--store", store)
    assert rc == 1 and "PROBLEM" in out
    rc, out, _ = ckpt("verify", "--store", store, "beta")
    assert rc == 0


# ---------------------------------------------------------------------------------------------- du
def test_du(store: Path, ckpt: CkptRunner) -> None:
    rc, out, _ = ckpt("du", "--store", store, "--json")
    assert rc == 0
    rows = {r["run"]: r for r in json.loads(out)}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"]["checkpoints"] == 4 and rows["beta"]["checkpoints"] == 1
    for r in rows.values():
        for field in ("logical_bytes", "stored_bytes", "pack_bytes", "ratio"):
            assert field in r
        assert r["logical_bytes"] > 0 and 0 < r["stored_bytes"] <= r["pack_bytes"]
    total_packs = sum(p.stat().st_size for p in (store / "packs").rglob("*.pack"))
    assert sum(r["pack_bytes"] for r in rows.values()) == total_packs
    rc, out, _ = ckpt("du", "--store", store)
    assert rc == 0 and "alpha" in out and "beta" in out


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv",
    [["show", "x@1"], ["rm", "x@1"], ["gc"], ["verify"], ["du"], ["ls"], ["export", "x@1", "-O", "{tmp}/out.pt"]],
)
def test_every_command_on_a_missing_store(tmp_path: Path, ckpt: CkptRunner, argv: list[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, err = ckpt(argv[0], "--store", tmp_path / "missing", *argv[1:])
    _one_line_error(rc, err, argv[0])
    assert not (tmp_path / "missing").exists()


def test_traceback_flag_reraises(tmp_path: Path) -> None:
    with pytest.raises(ckptstore.CkptStoreError):
        main(["--traceback", "ls", "--store", str(tmp_path / "missing")])


def test_bad_storage_option(tmp_path: Path, ckpt: CkptRunner) -> None:
    rc, _, err = ckpt("ls", "--store", tmp_path, "-o", "novalue")
    assert "KEY=VALUE" in _one_line_error(rc, err, "ls")
