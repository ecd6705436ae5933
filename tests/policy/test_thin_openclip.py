"""Acceptance on a real training trajectory: 20 epochs of the unmodified ``open_clip_train`` (tiny CLIP on 128
digits, warm-up + cosine, eval every epoch), stored by ``ckpt watch``; ``ckpt select RUN 8`` covers early, middle
and late training and the change points of the validation loss, explaining each choice; ``ckpt thin --keep
select:8`` frees what its dry run announced and every kept checkpoint stays bit-exact.

The run is trained once and cached (``ensure_trajectory``: about 2 minutes on 2 cores); the store is built once
for the module.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
for _m in ("open_clip", "open_clip_train", "sklearn", "pandas"):
    pytest.importorskip(_m)

import ckptstore  # noqa: E402
from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS = 20
RUN = "tiny-csv-e20-s0"


def ckpt(*argv: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    assert rc == 0, out.getvalue()
    text = out.getvalue()
    try:
        return json.loads(text)  # type: ignore[no-any-return]
    except ValueError:
        return {"lines": [json.loads(line) for line in text.splitlines() if line.startswith("{")]}


@pytest.fixture(scope="module")
def trajectory() -> Path:
    ckpts = tj.ensure_trajectory(epochs=EPOCHS, size="tiny", n_images=128)
    assert ckpts.parent.name == RUN
    return ckpts


@pytest.fixture(scope="module")
def store_path(trajectory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accept") / "s.ckpt"
    events = ckpt("watch", str(trajectory.parent), "--store", str(path), "--init", "--idle-timeout", "0", "--json")
    assert [e["step"] for e in events["lines"] if e["event"] == "stored"] == list(range(1, EPOCHS + 1))
    return path


@pytest.fixture(scope="module")
def selection(store_path: Path) -> dict[str, Any]:
    return ckpt("select", RUN, "8", "--store", str(store_path), "--json")


def test_select_8_covers_the_run_and_the_metric_change_points(selection: dict[str, Any], store_path: Path) -> None:
    choices = selection["choices"]
    for c in choices:
        print(f"  epoch {c['step']:>2}  {c['phase']:<6} {c['kind']:<8} {c['reason']}")
    assert selection["of"] == EPOCHS and len(choices) == 8
    steps = [c["step"] for c in choices]
    assert steps[0] == 1 and steps[-1] == EPOCHS
    assert [choices[0]["kind"], choices[-1]["kind"]] == ["first", "last"]
    # Early, middle and late training each hold a chosen checkpoint besides the first and the last.
    inner = choices[1:-1]
    assert {c["phase"] for c in inner} == {"early", "middle", "late"}
    # Coverage follows the weight path: the fast early phase gets more checkpoints than the slow end.
    assert sum(c["phase"] == "early" for c in choices) > sum(c["phase"] == "late" for c in choices)
    # Change points of the validation loss, each explained; the largest one-epoch drop is bracketed.
    change = [c for c in choices if c["kind"] == "change"]
    assert len(change) >= 2
    assert all(c["reason"].startswith("metric change point: clip_val_loss is") for c in change)
    store = ckptstore.open_store(store_path)
    loss = {i.step: i.metadata["metrics"]["clip_val_loss"] for i in store.checkpoints(RUN)}
    drop = max(range(2, EPOCHS + 1), key=lambda e: loss[e - 1] - loss[e])
    assert {drop - 1, drop} & set(steps), (drop, steps)
    assert all(c["reason"] for c in choices)
    coverage = [c for c in choices if c["kind"] == "coverage"]
    assert coverage and all("of the weight path" in c["reason"] for c in coverage)


def test_thin_to_the_selection_frees_the_bytes_and_keeps_the_rest_bit_exact(
    selection: dict[str, Any], store_path: Path, trajectory: Path, assert_same_state: Callable[[object, object], None]
) -> None:
    selected = [c["step"] for c in selection["choices"]]
    dry = ckpt("thin", RUN, "--keep", "select:8", "--store", str(store_path), "--dry-run", "--json")
    assert [k["step"] for k in dry["keep"]] == selected
    assert len(dry["drop"]) == EPOCHS - 8
    store = ckptstore.open_store(store_path)
    assert store.steps(RUN) == list(range(1, EPOCHS + 1))  # the dry run deleted nothing

    done = ckpt("thin", RUN, "--keep", "select:8", "--store", str(store_path), "--json")
    est, freed = dry["freed_estimate"], done["freed_bytes"]
    print(f"  thin --keep select:8: estimate {est / 1e6:.1f} MB, freed {freed / 1e6:.1f} MB "
          f"({done['run_bytes_before'] / 1e6:.1f} MB -> {done['run_bytes_after'] / 1e6:.1f} MB), "
          f"re-encoded {done['rewritten']} kept checkpoints")  # fmt: skip
    assert freed == done["run_bytes_before"] - done["run_bytes_after"] > 0
    assert abs(freed - est) <= 0.15 * est
    store = ckptstore.open_store(store_path)
    assert store.steps(RUN) == selected
    assert store.verify(RUN)["ok"]  # every object decodes to its content hash
    # Checkpoints whose delta base was deleted were re-encoded: compare two of them with the trainer's files.
    rebased = [s for s in selected[1:] if s - 1 not in selected][:2]
    for s in rebased:
        original = torch.load(trajectory / f"epoch_{s}.pt", map_location="cpu", weights_only=True)
        assert_same_state(store.load(f"{RUN}@{s}", tensors="torch"), original)
    again = ckpt("thin", RUN, "--keep", "select:8", "--store", str(store_path), "--json")
    assert again["drop"] == [] and again["freed_bytes"] == 0
