"""Every sub-command with bad paths and bad arguments: rc 2, one line naming what and where, no traceback, nothing
left behind (no ``.partial``, no empty store), output paths refused before any work."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptstore
from ckptstore.cli.main import EXIT_ERROR, main

# Every leaf command, with the positionals it needs to get past argument parsing.
COMMANDS: dict[str, list[str]] = {
    "init": [],
    "ls": [],
    "show": ["alpha@latest"],
    "rm": ["alpha@0"],
    "gc": [],
    "compact": ["alpha"],
    "verify": [],
    "du": [],
    "ingest": ["{tmp}/none.pt"],
    "export": ["alpha@latest", "-O", "{tmp}/x.pt"],
    "tag": ["alpha@latest", "t"],
    "untag": ["alpha@latest", "t"],
    "note": ["alpha@latest", "text"],
    "metrics": ["alpha"],
    "release": ["alpha", "-O", "{tmp}/rel", "--select", "1"],
    "thin": ["alpha", "--keep", "last:1"],
    "archive": ["alpha", "--keep", "last:1"],
    "select": ["alpha", "2"],
    "watch": ["{tmp}"],
    "analyze weights": ["alpha"],
    "analyze stability": ["alpha"],
    "analyze representations": ["alpha"],
    "analyze transfer": ["alpha"],
    "report": ["alpha"],
}
RUN_COMMANDS = ["ls", "compact", "verify", "metrics", "release", "thin", "archive", "select", "analyze weights",
                "analyze stability", "report"]  # fmt: skip


def _state(i: int) -> dict[str, Any]:
    return {"layer": {"weight": np.full((8, 8), i, np.float32), "bias": np.arange(8, dtype=np.float32) + i}}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    s = ckptstore.create_store(path)
    for i in range(3):
        s.save("alpha", 10 * i, _state(i), {"epoch": i, "metrics": {"val_loss": 1.0 / (i + 1)}})
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exits (--help, usage errors)
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, *must: str) -> str:
    assert rc == EXIT_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "[Errno" not in err, err
    for m in must:
        assert m in lines[0], (m, lines[0])
    return lines[0]


def _argv(command: str, tmp: Path) -> list[str]:
    return [*command.split(), *(a.replace("{tmp}", str(tmp)) for a in COMMANDS[command])]


# ------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_is_one_line_from_the_sub_command(command: str, tmp_path: Path, capsys: Any) -> None:
    rc, out, err = run(capsys, *_argv(command, tmp_path), "--no-such-flag")
    one_line(rc, err, f"ckpt {command}: error: unrecognized arguments: --no-such-flag", f"ckpt {command} --help")
    assert out == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_json_with_help(command: str, capsys: Any) -> None:
    rc, out, _ = run(capsys, *command.split(), "--help")
    assert rc == 0
    line = next(raw for raw in out.splitlines() if raw.strip().startswith("--json "))
    assert "JSON" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_on_a_missing_store(command: str, tmp_path: Path, capsys: Any) -> None:
    if command in ("init", "ingest", "watch"):
        return  # init creates it; ingest and watch are checked below (missing input, --init)
    rc, _, err = run(capsys, *_argv(command, tmp_path), "--store", tmp_path / "missing")
    one_line(rc, err, f"ckpt {command}: error: ", str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_a_missing_run_is_an_error(command: str, store: Path, tmp_path: Path, capsys: Any) -> None:
    argv = [a if a != "alpha" else "nope" for a in _argv(command, tmp_path)]
    if command in ("ls", "verify"):
        argv.append("nope")
    rc, out, err = run(capsys, *argv, "--store", store)
    one_line(rc, err, "'nope'")
    assert "OK" not in out


def test_traceback_flag_after_the_command(tmp_path: Path) -> None:
    with pytest.raises(ckptstore.CkptStoreError):
        main(["ls", "--store", str(tmp_path / "missing"), "--traceback"])


def test_release_refs_do_not_swallow_the_run(store: Path, tmp_path: Path, capsys: Any) -> None:
    rc, _, err = run(capsys, "release", "--refs", "0", "10", "nope", "--store", store, "-O", tmp_path / "rel")
    one_line(rc, err, "no run 'nope'")  # the run was taken as the run, not as a third reference


def test_unknown_columns_and_sort_keys(store: Path, capsys: Any) -> None:
    rc, _, err = run(capsys, "ls", "alpha", "--store", store, "--columns", "ref,nosuch")
    assert rc == EXIT_ERROR and "unknown column 'nosuch'" in err
    rc, _, err = run(capsys, "ls", "alpha", "--store", store, "--sort=-nosuch")
    assert rc == EXIT_ERROR and "unknown sort key 'nosuch'" in err
    rc, out, _ = run(capsys, "ls", "alpha", "--store", store, "--columns", "ref,metrics.val_loss", "--sort=-epoch")
    assert rc == 0 and out.index("alpha@20") < out.index("alpha@0")


# ---------------------------------------------------------------------------------------- output paths
def _bad_outputs(tmp: Path) -> list[tuple[str, str, str]]:
    (tmp / "adir").mkdir(exist_ok=True)
    return [
        ("existing folder", str(tmp / "adir"), "existing folder"),
        ("missing parent", str(tmp / "nodir" / "f.out"), "does not exist"),
        ("unwritable", "/proc/ckpt-test.out", "cannot write"),
    ]


OUTPUT_COMMANDS = {
    "export": ["export", "alpha@latest"],
    "export safetensors": ["export", "alpha@latest", "--format", "safetensors"],
    "metrics": ["metrics", "alpha"],
    "analyze weights": ["analyze", "weights", "alpha"],
    "analyze stability": ["analyze", "stability", "alpha"],
    "report": ["report", "alpha", "--no-representations", "--no-transfer"],
}


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_bad_output_paths_fail_before_the_work(command: str, store: Path, tmp_path: Path, capsys: Any) -> None:
    for label, out, why in _bad_outputs(tmp_path):
        rc, stdout, err = run(capsys, *OUTPUT_COMMANDS[command], "--store", store, "-O", out)
        one_line(rc, err, why, out)
        assert "..." not in err and stdout == "", (label, stdout)  # no stage started, nothing printed
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*ckpt-probe*"))
    assert not (tmp_path / "nodir").exists()


def test_release_into_a_file_or_missing_parent(store: Path, tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "afile").write_text("x")
    rc, _, err = run(capsys, "release", "alpha", "--select", "1", "--store", store, "-O", tmp_path / "afile")
    one_line(rc, err, "existing file")
    rc, _, err = run(capsys, "release", "alpha", "--select", "1", "--store", store, "-O", tmp_path / "no" / "rel")
    one_line(rc, err, "does not exist")


def test_an_error_while_writing_leaves_no_partial(store: Path, tmp_path: Path, capsys: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import torch

    def full_disk(*a: Any, **k: Any) -> None:
        Path(a[1]).write_bytes(b"half")
        raise OSError(28, "No space left on device", str(a[1]))

    monkeypatch.setattr(torch, "save", full_disk)
    rc, _, err = run(capsys, "export", "alpha@latest", "--store", store, "-O", tmp_path / "x.pt")
    one_line(rc, err, f"{tmp_path / 'x.pt'}: no space left on device", "free some space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# --------------------------------------------------------------------------------------------- ingest
class NotAllowed:  # a global torch.load(weights_only=True) refuses
    pass


def test_ingest_of_a_bad_file_leaves_no_store_and_no_foreign_warning(tmp_path: Path, capsys: Any) -> None:
    import torch

    bad = tmp_path / "epoch_1.pt"
    # The legacy format with pickle protocol 4 makes torch warn ("Detected pickle protocol 4 ...") before it refuses.
    torch.save({"obj": NotAllowed(), "d": collections.OrderedDict()}, bad, pickle_protocol=4,
               _use_new_zipfile_serialization=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc, _, err = run(capsys, "ingest", bad, "--store", tmp_path / "new", "--init")
    line = one_line(rc, err, str(bad), "refused to load")
    assert "Warning" not in err and not seen
    assert line.rstrip().endswith(("accepts", ".", ")")), line  # torch's message whole, then our hint
    assert not (tmp_path / "new").exists()


def test_ingest_of_a_missing_file(tmp_path: Path, capsys: Any) -> None:
    rc, _, err = run(capsys, "ingest", tmp_path / "nope.pt", "--store", tmp_path / "new", "--init")
    one_line(rc, err, str(tmp_path / "nope.pt"), "no such file")
    assert not (tmp_path / "new").exists()


def test_init_takes_the_path_the_hint_names(tmp_path: Path, capsys: Any) -> None:
    rc, _, err = run(capsys, "ls", "--store", tmp_path / "s")
    assert "ckpt init" in one_line(rc, err)
    rc, out, err = run(capsys, "init", tmp_path / "s")
    assert rc == 0, err
    assert ckptstore.open_store(tmp_path / "s").runs() == []
    rc, out, _ = run(capsys, "init", tmp_path / "t", "--json")
    assert rc == 0 and '"created": true' in out


def test_the_console_command_prints_no_traceback(tmp_path: Path) -> None:
    """The real process: what a user sees in a terminal."""
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    for argv in (["export", "x@1", "-O", "/proc/x.pt", "--store", str(tmp_path)], ["ls", "--bogus"],
                 ["analyze", "weights", "--bogus", "r"]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "ckptstore.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)  # fmt: skip
        assert proc.returncode == EXIT_ERROR, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_safetensors_export_follows_the_umask(store: Path, tmp_path: Path, capsys: Any) -> None:
    old = os.umask(0o022)
    try:
        for fmt in ("pt", "safetensors"):
            out = tmp_path / f"x.{fmt}"
            rc, _, err = run(capsys, "export", "alpha@latest", "--store", store, "-O", out, "--format", fmt)
            assert rc == 0, err
            assert out.stat().st_mode & 0o777 == 0o644, (fmt, oct(out.stat().st_mode))
    finally:
        os.umask(old)


def test_docs_cli_lists_every_option_with_one_meaning() -> None:
    """docs/cli.md's table names every option of every command, and no spelling means two things."""
    from ckptstore.cli.main import _leaf_parsers, build_parser

    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    table = doc[doc.index("## Options") :]
    dests: dict[str, set[str]] = {}
    for leaf in _leaf_parsers(build_parser()):
        for action in leaf._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}" in table or f" {opt} " in table or f"{opt}`" in table, (leaf.prog, opt)
                    dests.setdefault(opt, set()).add(action.dest)
    assert {opt: d for opt, d in dests.items() if len(d) > 1} == {}
    assert dests["-o"] == {"storage_option"} and dests["-O"] == {"out"}
