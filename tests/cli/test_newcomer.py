"""A new user's first hour, end to end on the demo's run: the README's walk through the CLI, in an 80-column
terminal, checking what issue 17 found wrong (cut names, step = epoch, silent long steps, leaked warnings).

Reuses the cached demo trajectory (``ckptstore.demo.trajectory.ensure_trajectory``, trained once per machine)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptstore.cli.main import main
from ckptstore.demo import trajectory as tj

WIDTH = 80


@pytest.fixture(scope="module")
def checkpoints() -> Path:
    return tj.ensure_trajectory(epochs=2, size="tiny", n_images=256)


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, (argv, err)
    assert "Traceback" not in err and "Warning" not in err, err
    return out, err


def fits(out: str) -> None:
    """Every line fits, unless one word (a long path) cannot be broken without cutting it."""
    for line in out.splitlines():
        assert len(line) <= WIDTH or max(map(len, line.split())) > WIDTH // 2, line
    assert "…" not in out


def test_the_walk(checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.chdir(tmp_path)
    os.umask(0o022)
    store = "runs.ckpt"

    # The hint of a missing store names a command that works as printed.
    capsys.readouterr()
    assert main(["ls", "--store", store]) == 2
    assert "ckpt init" in capsys.readouterr().err
    out, _ = run(capsys, "init", store)
    assert "created store" in out

    out, err = run(capsys, "ingest", checkpoints, "--store", store, "--run", "demo")
    assert out.count("-> demo@") == 2

    # ls: the training step, not the epoch again.
    out, _ = run(capsys, "ls", "demo", "--store", store)
    fits(out)
    rows = json.loads(run(capsys, "ls", "demo", "--store", store, "--json")[0])
    steps = [r["metadata"]["step"] for r in rows]
    assert [r["metadata"]["epoch"] for r in rows] == [1, 2] and steps[0] > 1
    body = [line.split() for line in out.splitlines()[2:4]]
    assert [int(cells[2]) for cells in body] == steps, out

    # Wide tables stay whole at 80 columns: every metric name and every ref.
    out, _ = run(capsys, "ls", "demo", "--store", store, "--columns", "ref,epoch,metrics.*")
    fits(out)
    for name in rows[0]["metadata"]["metrics"]:
        assert f"metrics.{name}" in out
    assert "demo@1" in out and "demo@2" in out
    out, _ = run(capsys, "metrics", "demo", "--store", store)
    fits(out)
    assert "metrics.image_to_text_R@10" in out
    # the training step, not the epoch the store keys these checkpoints by
    assert any(line.split() == ["step", str(steps[0])] for line in out.splitlines()), out
    assert "metadata.step" not in out
    out, _ = run(capsys, "metrics", "demo", "--store", store, "-O", "m.csv")
    assert Path("m.csv").read_text().count("\n") == 3
    assert run(capsys, "metrics", "demo", "--store", store, "--csv")[0] == Path("m.csv").read_text()

    # show --tensors: weight and bias never look alike; no "(?)" placeholders.
    out, _ = run(capsys, "show", "demo@latest", "--store", store, "--tensors")
    fits(out)
    tensors = json.loads(run(capsys, "show", "demo@latest", "--store", store, "--json")[0])["tensor_list"]
    lines = set(out.splitlines())
    for t in tensors:
        assert t["name"] in lines or any(line.startswith(t["name"] + " ") for line in lines), t["name"]
    assert "(?)" not in out and "world size ?" not in out

    # Tags, notes, a release by references given before the run, exports that follow the umask.
    run(capsys, "tag", "demo@best:clip_val_loss", "release", "--store", store)
    run(capsys, "note", "demo@tag:release", "shipped", "--store", store)
    out, _ = run(capsys, "release", "--refs", "1", "2", "demo", "--store", store, "-O", "rel", "--json")
    folders = [c["folder"] for c in json.loads(out)["checkpoints"]]
    assert folders == [f"epoch-01-step-{steps[0]}", f"epoch-02-step-{steps[1]}"]
    for fmt, name in (("pt", "e2.pt"), ("safetensors", "e2.safetensors")):
        run(capsys, "export", "demo@epoch=2", "--store", store, "--format", fmt, "-O", name)
        assert stat.S_IMODE(Path(name).stat().st_mode) == 0o644, fmt
    assert not list(tmp_path.rglob("*.partial"))

    out, _ = run(capsys, "verify", "demo", "--store", store)
    assert "OK" in out
    fits(run(capsys, "du", "--store", store)[0])
    fits(run(capsys, "select", "demo", "2", "--store", store)[0])
    out, _ = run(capsys, "thin", "demo", "--keep", "last:1", "--dry-run", "--store", store)
    fits(out.split("\ndemo: keeps")[0])  # the table; the summary after it is prose, which a terminal wraps

    # The analyses, with --out and --json; the report tells which section it is in.
    out, _ = run(capsys, "analyze", "weights", "demo", "--store", store, "--no-spectral", "-O", "w.json")
    fits(out.split("\nmodel:")[0])
    assert json.loads(Path("w.json").read_text())["modules"]
    out, err = run(capsys, "report", "demo", "--store", store, "-O", "report.html")
    for section in ("weight dynamics", "representations", "transfer", "figures and page"):
        assert f"ckpt report: {section} ..." in err and f"ckpt report: {section}: done in" in err, err
    assert out.splitlines()[0] == "report.html" and Path("report.html").stat().st_size > 10_000


def test_help_of_every_command_in_a_real_process() -> None:
    """`ckpt COMMAND --help` as a user runs it: rc 0, names --json and -O/--out where the command writes."""
    for argv in (["--help"], ["report", "--help"], ["export", "--help"], ["metrics", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "ckptstore.cli", *argv], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        if argv != ["--help"]:
            assert "--json" in proc.stdout and "-O" in proc.stdout
