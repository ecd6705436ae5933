"""The weights-only tier: ``Store.drop_parts``, ``plan_tiers``, ``ckpt thin --keep-weights``, the recorder.

Dropping the optimizer state of older checkpoints keeps every remaining tensor bit-exact (raw bytes compared
with what was saved), frees the space after gc, survives a crash between the manifest rewrite and the rebase,
and is said everywhere (``ls``, ``show``, ``--json``).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.errors import InvalidStateError  # noqa: E402
from ckptstore.format import tree  # noqa: E402
from ckptstore.policy import Entry, InvalidPolicyError, parse_retention, plan_tiers, thin  # noqa: E402
from ckptstore.store import Store, create_store, open_store  # noqa: E402

STEPS = 8


def _train(store: Store, steps: int = STEPS, run: str = "r") -> dict[int, dict[str, bytes]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    saved: dict[int, dict[str, bytes]] = {}
    for step in range(1, steps + 1):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
        state = {"epoch": step, "name": "t", "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
        store.save(run, step, state, {"epoch": step, "metrics": {"val_loss": 1.0 / step}})
        _, leaves = tree.flatten(state)
        saved[step] = {n: lf.data.tobytes() for n, lf in leaves.items()}
    return saved


def _assert_exact(store: Store, saved: dict[int, dict[str, bytes]], run: str = "r") -> None:
    for step in store.steps(run):
        m = store.manifest(run, step)
        leaves = store.load_leaves(m)
        assert set(leaves) <= set(saved[step])
        for n, lf in leaves.items():
            assert lf.data.tobytes() == saved[step][n], (step, n)
        if m.info().dropped:
            assert set(saved[step]) - set(leaves) == {n for n in saved[step] if n.startswith("optimizer/")}
        else:
            assert set(leaves) == set(saved[step])


def ckpt(*argv: str) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ckpt_main(list(argv))
    assert rc == 0, out.getvalue()
    text = out.getvalue()
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return text


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[Store, dict[int, dict[str, bytes]], Path]:
    path = tmp_path / "s.ckpt"
    store = create_store(path)
    return store, _train(store), path


def test_drop_parts_keeps_the_rest_bit_exact_and_frees_space(trained: Any) -> None:
    store, saved, _ = trained
    before = store.stats("r")["pack_bytes"]
    res = store.drop_parts([f"r@{s}" for s in range(1, STEPS - 1)])
    assert res["changed"] == [f"r@{s}" for s in range(1, STEPS - 1)]
    assert res["dropped_tensors"] == 12 * (STEPS - 2)  # 4 params x (step, exp_avg, exp_avg_sq)
    assert res["rewritten"] >= 1  # the newest checkpoints' optimizer deltas ran through the dropped objects
    after = store.stats("r")["pack_bytes"]
    assert res["freed_bytes"] == before - after > 0
    assert store.verify()["ok"]
    fresh = open_store(store.url)  # nothing cached: what a new reader sees
    _assert_exact(fresh, saved)
    state = fresh.load(f"r@{1}", tensors="torch")
    assert sorted(state) == ["epoch", "name", "state_dict"]
    assert fresh.manifest("r", 1).info().dropped == ["optimizer"]
    assert fresh.manifest("r", STEPS).info().dropped == []
    # what is left takes about what a store that never held that optimizer state takes
    ref = create_store(Path(store.url) / ".." / "ref.ckpt")
    for s in range(1, STEPS + 1):
        full = fresh.load(f"r@{s}", tensors="torch")
        ref.save("r", s, full)
    assert after <= ref.stats("r")["pack_bytes"] * 1.05


def test_drop_parts_twice_changes_nothing_and_delete_after_it_stays_exact(trained: Any) -> None:
    store, saved, _ = trained
    store.drop_parts(["r@2", "r@3"])
    again = store.drop_parts(["r@2", "r@3"])
    assert again["changed"] == [] and again["freed_bytes"] == 0
    store.delete(["r@3", "r@5"])
    assert store.verify()["ok"]
    _assert_exact(open_store(store.url), saved)


def test_a_crash_between_the_manifest_rewrite_and_the_rebase_loses_nothing(
    trained: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, saved, _ = trained

    def crash(*a: Any, **k: Any) -> int:
        raise KeyboardInterrupt("killed during the rebase")

    monkeypatch.setattr(Store, "_rebase", crash)
    with pytest.raises(KeyboardInterrupt):
        store.drop_parts([f"r@{s}" for s in range(1, STEPS - 1)])
    monkeypatch.undo()
    fresh = open_store(store.url)
    fresh.gc()  # gc after the crash must not free what the not-yet-rebased checkpoints still read
    assert fresh.verify()["ok"]
    _assert_exact(fresh, saved)


def test_drop_parts_refuses_sharded_checkpoints_and_unknown_parts(trained: Any) -> None:
    store, _, _ = trained
    with pytest.raises(InvalidStateError, match="unknown checkpoint part"):
        store.drop_parts(["r@1"], ["scheduler"])
    assert store.manifest("r", 1).info().dropped == []


def _entries(n: int) -> list[Entry]:
    return [Entry(s, s, {"val_loss": 1.0 / s}) for s in range(1, n + 1)]


def test_plan_tiers_last_two_whole_the_rest_weights_only() -> None:
    p = plan_tiers(_entries(10), parse_retention("last:2"), parse_retention("all"))
    assert sorted(p.keep) == list(range(1, 11)) and not p.drop
    assert sorted(p.weights_only) == list(range(1, 9))
    assert any("optimizer state dropped" in r for r in p.weights_only[1])
    d = p.as_dict()
    assert [w["step"] for w in d["weights_only"]] == list(range(1, 9))
    # weights for every other checkpoint, whole for the best one: the rest goes
    p = plan_tiers(_entries(10), parse_retention("best:val_loss:1"), parse_retention("every:2"))
    assert sorted(p.drop) == [3, 5, 7, 9]  # every:2 keeps the first at or after 0, 2, 4 ...: 1, 2, 4, 6, 8, 10
    assert 10 not in p.weights_only  # best and latest stay whole
    assert sorted(p.weights_only) == [1, 2, 4, 6, 8]


def test_all_is_a_retention_policy() -> None:
    (pol,) = parse_retention("all")
    assert pol.to_json() == {"kind": "all"}
    with pytest.raises(InvalidPolicyError):
        parse_retention("all:3")


def test_thin_keep_weights_on_the_command_line(trained: Any) -> None:
    _store, saved, path = trained
    dry = ckpt("thin", "r", "--store", str(path), "--keep", "last:2", "--keep-weights", "all", "-n", "--json")
    assert [w["step"] for w in dry["weights_only"]] == list(range(1, STEPS - 1))
    assert open_store(path).manifest("r", 1).info().dropped == []  # a dry run changes nothing
    res = ckpt("thin", "r", "--store", str(path), "--keep", "last:2", "--keep-weights", "all", "--json")
    assert res["slimmed"] == [f"r@{s}" for s in range(1, STEPS - 1)]
    assert res["run_bytes_before"] - res["run_bytes_after"] == res["freed_bytes"] > 0
    again = ckpt("thin", "r", "--store", str(path), "--keep", "last:2", "--keep-weights", "all", "--json")
    assert again["slimmed"] == [] and again["freed_bytes"] == 0 and again["deleted"] == []
    rows = ckpt("ls", "r", "--store", str(path), "--json")
    assert [r["dropped"] for r in rows] == [["optimizer"]] * (STEPS - 2) + [[]] * 2
    text = ckpt("ls", "r", "--store", str(path))
    assert text.count("weights only (no optimizer state)") == STEPS - 2 and "complete" in text
    shown = ckpt("show", "r@1", "--store", str(path), "--json")
    assert shown["dropped"][0]["part"] == "optimizer" and shown["dropped"][0]["reason"] == "thin --keep-weights"
    assert "cannot resume training" in ckpt("show", "r@1", "--store", str(path))
    ckpt("verify", "--store", str(path))
    _assert_exact(open_store(path), saved)


def test_ls_of_a_complete_run_is_unchanged(trained: Any) -> None:
    _, _, path = trained
    assert "content" not in ckpt("ls", "r", "--store", str(path))


def test_thin_api_keep_weights(trained: Any) -> None:
    store, saved, _ = trained
    the_plan, recs = thin.plan_thin(store, "r", "last:3", keep_weights="every:2")
    res = thin.apply_plan(store, "r", the_plan, recs)
    assert res["deleted"] == ["r@3", "r@5"]
    assert res["weights_only"] == ["r@1", "r@2", "r@4"]
    _assert_exact(open_store(store.url), saved)


def test_recorder_keeps_optimizer_state_for_the_newest_two(tmp_path: Path) -> None:
    from ckptstore.recorder import Recorder

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    store = create_store(tmp_path / "s.ckpt")
    rec = Recorder(store, "r", model=model, optimizer=opt, policy="steps:1", keep="last:2", keep_weights="all")
    for step in range(1, 7):
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        rec.step(step)
    dropped = {i.step: i.dropped for i in store.checkpoints("r")}
    assert dropped == {1: ["optimizer"], 2: ["optimizer"], 3: ["optimizer"], 4: ["optimizer"], 5: [], 6: []}
    assert store.verify()["ok"]
    with pytest.raises(InvalidPolicyError, match="keep_weights needs keep"):
        Recorder(store, "q", model=model, keep_weights="all")


def test_watch_keeps_optimizer_state_for_the_newest_two(tmp_path: Path) -> None:
    from ckptstore.integrations.watch import Watcher

    store = create_store(tmp_path / "s.ckpt")
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    t = [0.0]
    w = Watcher(store, tmp_path / "run", run="r", keep="last:2", keep_weights="all", settle=0.0, clock=lambda: t[0])
    for e in range(1, 5):
        opt = {"state": {0: {"exp_avg": torch.randn(16, 8)}}, "param_groups": [{"lr": 1e-3}]}
        state = {"epoch": e, "name": "r", "state_dict": {"w": torch.randn(16, 8)}, "optimizer": opt}
        torch.save(state, ck / f"epoch_{e}.pt")
        for _ in range(2):
            t[0] += 5.0
            w.scan()
    assert {i.step: i.dropped for i in store.checkpoints("r")} == {1: ["optimizer"], 2: ["optimizer"], 3: [], 4: []}
    thinned = [ev for ev in w.events if ev.kind == "thinned"]
    assert thinned and "dropped the optimizer state of r@1" in thinned[0].message
    assert store.verify()["ok"]
