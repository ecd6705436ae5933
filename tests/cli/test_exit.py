"""The ``ckpt`` program ends its process itself once the command is done and torch is loaded (cli.main._end_process):
what the interpreter's teardown would still have done (wait for threads, atexit handlers, flush stdout) is done, and
``main(argv)`` called by a program always returns."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

_SCRIPT = """
import atexit, os, sys, threading
{preamble}
sys.argv = ["ckpt", "init", "--store", sys.argv[1]]
atexit.register(lambda: open(sys.argv[-1] + ".atexit", "w").write("ran"))
sys.stdout.write("x" * 200_000 + "\\n")  # buffered (stdout is a pipe): must still arrive
from ckptstore.cli.main import main
rc = main()
print("main returned", rc, flush=True)
{after}
sys.exit(rc)
"""


def _run(tmp_path: Path, preamble: str, after: str = "") -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp_path.mkdir(exist_ok=True)
    store = tmp_path / "store"
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(preamble=preamble, after=after)))
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run(
        [sys.executable, str(script), str(store)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    return proc, store


def test_with_torch_loaded_the_program_ends_after_the_command_with_atexit_run_and_output_flushed(
    tmp_path: Path,
) -> None:
    proc, store = _run(tmp_path, "import torch")
    assert proc.returncode == 0, proc.stderr
    assert "main returned" not in proc.stdout  # the process ended inside main()
    assert proc.stdout.startswith("x" * 200_000 + "\n")  # everything written before is there
    assert "created store" in proc.stdout, proc.stdout[-300:]
    assert store.is_dir()
    assert Path(str(store) + ".atexit").read_text() == "ran"  # the atexit handlers ran
    assert proc.stderr == ""


def test_without_torch_main_returns_and_the_exit_is_the_normal_one(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, "")
    assert proc.returncode == 0, proc.stderr
    assert "main returned 0" in proc.stdout


def test_the_exit_waits_for_a_live_thread_as_the_normal_exit_does(tmp_path: Path) -> None:
    work = "def work():\n    import time; time.sleep(1.0); open(sys.argv[-1] + '.thread', 'w').write('done')\n"
    proc, store = _run(tmp_path, "import torch\n" + work + "threading.Thread(target=work).start()")
    assert proc.returncode == 0, proc.stderr
    assert "main returned" not in proc.stdout
    assert Path(str(store) + ".thread").read_text() == "done"  # the thread finished before the process ended
    assert Path(str(store) + ".atexit").read_text() == "ran"


def test_main_with_argv_always_returns(tmp_path: Path) -> None:
    import torch  # noqa: F401  (loaded, as in a test process)

    from ckptstore.cli.main import main

    assert main(["init", "--store", str(tmp_path / "s")]) == 0
