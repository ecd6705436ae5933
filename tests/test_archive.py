"""The lossy archive tier in a store: ``ckptstore.archive.archive`` and ``ckpt archive``.

Kept checkpoints stay bit-exact, converted ones are within the recorded bound of the originals for every
tensor (compared with what was saved), other tensors stay exact, ``verify`` passes and checks the record,
space is freed, and every lossy checkpoint says so (ls, show, export's file name)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptstore import archive  # noqa: E402
from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.errors import InvalidStateError  # noqa: E402
from ckptstore.format import tree  # noqa: E402
from ckptstore.format.manifest import manifest_bytes  # noqa: E402
from ckptstore.store import Store, create_store, open_store  # noqa: E402

STEPS = 8


def _train(store: Store) -> dict[int, dict[str, tree.Leaf]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    saved = {}
    for step in range(1, STEPS + 1):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
        state = {"epoch": step, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
        store.save("r", step, state, {"epoch": step})
        _, leaves = tree.flatten(state)
        saved[step] = {n: tree.Leaf(lf.dtype, lf.shape, lf.data.copy()) for n, lf in leaves.items()}
    return saved


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[Store, dict[int, dict[str, tree.Leaf]], Path]:
    path = tmp_path / "s.ckpt"
    store = create_store(path)
    return store, _train(store), path


def _check(store: Store, saved: dict[int, dict[str, tree.Leaf]]) -> int:
    lossy_tensors = 0
    for s in store.steps("r"):
        m = store.manifest("r", s)
        leaves = store.load_leaves(m)
        assert set(leaves) == set(saved[s])
        for n, lf in leaves.items():
            want = saved[s][n]
            rec = (archive.lossy_info(m) or {}).get("tensors", {}).get(n)
            if rec is None:
                assert lf.data.tobytes() == want.data.tobytes(), (s, n)
                continue
            lossy_tensors += 1
            x, y = want.to_numpy().astype(np.float64), lf.to_numpy().astype(np.float64)
            err = np.abs(y - x)
            if rec["bound"]["mode"] == "elem":
                assert np.all(err <= rec["bound"]["value"] * np.abs(x)), (s, n)
            else:
                assert np.all(err <= rec["eps"]) and float(err.max()) == rec["max_err"], (s, n)
    return lossy_tensors


def ckpt(*argv: str) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    assert rc == 0, out.getvalue()
    with contextlib.suppress(ValueError):
        return json.loads(out.getvalue())
    return out.getvalue()


def test_archive_keeps_key_checkpoints_exact_and_the_rest_within_the_bound(trained: Any) -> None:
    store, saved, _ = trained
    before = store.stats("r")["pack_bytes"]
    res = archive.archive(store, "r", "first,last:1")
    assert res["converted"] == [f"r@{s}" for s in range(2, STEPS)]
    assert res["freed_bytes"] == before - store.stats("r")["pack_bytes"] > 0
    fresh = open_store(store.url)
    assert fresh.verify()["ok"]
    assert _check(fresh, saved) == (STEPS - 2) * 12  # 4 weights + 4 exp_avg + 4 exp_avg_sq per checkpoint
    assert [archive.is_lossy(fresh.manifest("r", s)) for s in fresh.steps("r")] == [False] + [True] * 6 + [False]
    again = archive.archive(fresh, "r", "first,last:1")  # one-way and idempotent: nothing converted twice
    assert again["converted"] == [] and again["freed_bytes"] == 0


def test_verify_checks_the_recorded_bound(trained: Any) -> None:
    store, _, _ = trained
    archive.archive(store, "r", "last:1")
    m = store.manifest("r", 3)
    data = json.loads(json.dumps(m.data))
    name = next(iter(data["lossy"]["tensors"]))
    rec = data["lossy"]["tensors"][name]
    rec["max_err"] = (rec["eps"] or rec["bound"]["value"]) * 2
    store.storage.write(m.key, manifest_bytes(data))
    res = open_store(store.url).verify()
    assert not res["ok"] and any("not within its bound" in p and "r@3" in p for p in res["problems"])


def test_bad_bounds_are_refused() -> None:
    assert archive.parse_bounds("weights=abs:1e-4")["weights"].as_dict() == {"mode": "abs", "value": 1e-4}
    for bad in ("weights=elem:0.1", "exp_avg_sq=rel:0.1", "nope=rel:1", "weights=rel:x", "weights"):
        with pytest.raises(InvalidStateError):
            archive.parse_bounds(bad)


def test_archive_on_the_command_line_labels_every_lossy_checkpoint(trained: Any, tmp_path: Path) -> None:
    _store, saved, path = trained
    dry = ckpt("archive", "r", "--store", str(path), "--keep", "first", "--keep", "last:1", "-n", "--json")
    assert dry["to_convert"] == [f"r@{s}" for s in range(2, STEPS)]
    assert not archive.is_lossy(open_store(path).manifest("r", 2))  # a dry run changes nothing
    res = ckpt("archive", "r", "--store", str(path), "--keep", "first,last:1", "--bound", "weights=rel:1e-4",
               "--json")  # fmt: skip
    assert res["bounds"]["weights"] == {"mode": "rel", "value": 1e-4} and len(res["converted"]) == STEPS - 2
    rows = ckpt("ls", "r", "--store", str(path), "--json")
    assert [r["dropped"] for r in rows] == [[]] + [["lossless"]] * (STEPS - 2) + [[]]
    assert ckpt("ls", "r", "--store", str(path)).count("LOSSY") == STEPS - 2
    assert "LOSSY" in ckpt("show", "r@2", "--store", str(path))
    assert ckpt("show", "r@2", "--store", str(path), "--json")["lossy"]["codec"] == "lossy-q"
    # export: the file name must say lossy, checked before anything is written
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        rc = ckpt_main(["export", "r@2", "--store", str(path), "-O", str(tmp_path / "e2.pt")])
    assert rc == 2 and "LOSSY" in out.getvalue() and not (tmp_path / "e2.pt").exists()
    ckpt("export", "r@2", "--store", str(path), "-O", str(tmp_path / "e2.lossy.pt"))
    got = torch.load(tmp_path / "e2.lossy.pt", weights_only=True)
    assert sorted(got) == ["epoch", "optimizer", "state_dict"]
    ckpt("verify", "--store", str(path))
    _check(open_store(path), saved)


def test_a_lossless_checkpoint_after_lossy_ones_stays_exact_after_delete(trained: Any) -> None:
    store, saved, _ = trained
    archive.archive(store, "r", "every:4,first")
    store.delete(["r@3"])
    fresh = open_store(store.url)
    assert fresh.verify()["ok"]
    _check(fresh, saved)


def test_release_folder_names_say_lossy(trained: Any) -> None:
    from ckptstore.release import folder_name

    store, _, _ = trained
    archive.archive(store, "r", "last:1")
    assert folder_name(store.manifest("r", 2)) == "epoch-02-step-2-lossy"
    assert folder_name(store.manifest("r", STEPS)) == f"epoch-{STEPS:02d}-step-{STEPS}"


def test_a_crash_before_the_old_bytes_are_freed_loses_nothing(trained: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, saved, _ = trained

    def crash(*a: Any, **k: Any) -> int:
        raise KeyboardInterrupt("killed while rebasing")

    monkeypatch.setattr(Store, "_rebase", crash)
    with pytest.raises(KeyboardInterrupt):
        archive.archive(store, "r", "first,last:1")
    monkeypatch.undo()
    fresh = open_store(store.url)
    fresh.gc()  # the lossless dependents still name the old objects: gc must keep them
    assert fresh.verify()["ok"]
    assert _check(fresh, saved) == (STEPS - 2) * 12


def test_a_bad_bound_on_the_command_line_is_one_line_and_touches_nothing(trained: Any) -> None:
    _store, _, path = trained
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = ckpt_main(["archive", "r", "--store", str(path), "--keep", "last:1", "--bound", "weights=elem:0.1"])
    assert rc == 2 and len(err.getvalue().strip().splitlines()) == 1 and "weights=elem:0.1" in err.getvalue()
    assert not any(archive.is_lossy(open_store(path).manifest("r", s)) for s in range(1, STEPS + 1))
