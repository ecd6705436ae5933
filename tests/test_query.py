"""Queries: the ``--where`` language (every operator, precedence, errors that point at the problem, no ``eval``),
``--sort``/``--columns``, every reference form end to end, ``ckpt ls/show/metrics`` and the Python API."""

from __future__ import annotations

import ast
import builtins
import contextlib
import csv
import importlib
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore import metadata as md
from ckptstore import query
from ckptstore.cli.main import main as ckpt_main
from ckptstore.errors import CheckpointNotFoundError, InvalidQueryError, MissingDependencyError

RUN = "clip"
# step -> (epoch, val_loss, zeroshot_top1)
ROWS = {400: (1, 0.9, 0.2), 800: (2, 0.6, 0.4), 1200: (3, 0.45, 0.55), 1600: (4, 0.5, 0.6), 2000: (5, 0.55, 0.58)}


def ckpt(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q") / "store"
    s = ckptstore.create_store(path)
    x = np.arange(256, dtype=np.float32)
    for step, (epoch, val_loss, top1) in ROWS.items():
        meta: dict[str, Any] = {
            "schema": 1,
            "step": step,
            "epoch": epoch,
            "samples_seen": step * 64,
            "lr": [1e-3 / epoch, 5e-4 / epoch],
            "loss": {"last": 1.0 / epoch, "avg": 1.1 / epoch, "window": 50},
            "metrics": {"val_loss": val_loss, "zeroshot_top1": top1},
            "model": "ViT-B-32" if epoch % 2 else "RN50",
            "hparams": {"batch size": 64, "warmup": 100},
        }
        if epoch == 2:
            meta["metrics"]["val/acc"] = 0.5  # a name with a slash, on one checkpoint only
            meta["grad_norm"] = math.inf
        if epoch == 5:
            meta["tags"] = ["final"]
            meta["loss"]["last"] = math.nan
        s.save(RUN, step, {"w": x * step}, meta)
    s.save("other", 7, {"w": x}, {"epoch": 1, "metrics": {"val_loss": 0.1}})
    return path


@pytest.fixture(scope="module")
def store(store_path: Path) -> ckptstore.Store:
    return ckptstore.open_store(store_path)


# ------------------------------------------------------------------------------------------- the language
WHERE = [
    ("metrics.zeroshot_top1 > 0.5 and epoch >= 3", [1200, 1600, 2000]),
    ("epoch == 3", [1200]),
    ("epoch = 3", [1200]),
    ("epoch != 3", [400, 800, 1600, 2000]),
    ("epoch <> 3", [400, 800, 1600, 2000]),
    ("epoch < 2", [400]),
    ("epoch <= 2", [400, 800]),
    ("epoch > 4", [2000]),
    ("epoch >= 4", [1600, 2000]),
    ("epoch in [1, 3, 5]", [400, 1200, 2000]),
    ("epoch not in [1, 3, 5]", [800, 1600]),
    ("'final' in tags", [2000]),
    ('"final" not in tags', [400, 800, 1200, 1600]),
    ("'ViT' in model", [400, 1200, 2000]),  # substring
    ("model == 'RN50'", [800, 1600]),
    ("model > 'S'", [400, 1200, 2000]),  # strings compare with strings
    ("not epoch > 1", [400]),
    ("not (epoch > 1 and epoch < 5)", [400, 2000]),
    ("epoch == 1 or epoch == 5 and metrics.val_loss > 1", [400]),  # 'and' binds tighter than 'or'
    ("(epoch == 1 or epoch == 5) and metrics.val_loss > 0.5", [400, 2000]),
    ("EPOCH == 1", []),  # field names are case-sensitive ...
    ("epoch == 1 OR epoch == 2", [400, 800]),  # ... keywords are not
    ("metrics.val/acc == 0.5", [800]),
    ("metrics.val/acc == null", [400, 1200, 1600, 2000]),
    ("metrics.val/acc != null", [800]),
    ("metrics.val/acc < 1", [800]),  # a missing value fails every ordering
    ("not metrics.val/acc < 1", [400, 1200, 1600, 2000]),
    ('metrics["val/acc"] >= 0.5', [800]),
    ("tags", [2000]),  # a bare field: present and truthy
    ("not tags", [400, 800, 1200, 1600]),
    ("lr.0 < 4e-4", [1200, 1600, 2000]),
    ("lr[1] == 2.5e-4", [800]),
    ("lr.5 == null", [400, 800, 1200, 1600, 2000]),
    ("hparams['batch size'] == 64 and hparams.warmup == 100", [400, 800, 1200, 1600, 2000]),
    ("step >= 1200 and step < 2000", [1200, 1600]),  # the checkpoint's step
    ("samples_seen == 76800", [1200]),
    ("metadata.step == 800", [800]),
    ("ref == 'clip@1600'", [1600]),
    ("loss.last > 0.3", [400, 800, 1200]),  # NaN compares false ...
    ("loss.last != loss.last", [2000]),  # ... and unequal to itself
    ("grad_norm > 1e300", [800]),  # +inf
    ("epoch > -1 and -1 < epoch", [400, 800, 1200, 1600, 2000]),
    ("epoch == 3.0", [1200]),
    ("true", [400, 800, 1200, 1600, 2000]),
    ("epoch == 1 or false", [400]),
    ("metrics.zeroshot_top1 >= .55", [1200, 1600, 2000]),
]


@pytest.mark.parametrize(("expr", "steps"), WHERE)
def test_where(store: ckptstore.Store, expr: str, steps: list[int]) -> None:
    rows = query.select(store, RUN, where=expr)
    assert [r["step"] for r in rows] == steps


BAD = [
    ("metrics.acc > and epoch >= 3", 14, "expected a value after '>'"),
    ("epoch >= 3 && x", 11, "unexpected character '&'"),
    ("(epoch > 1", 10, "expected ')'"),
    ("epoch > 1)", 9, "expected 'and', 'or' or the end"),
    ("epoch 3", 6, "expected 'and', 'or' or the end"),
    ('"abc', 0, "unterminated string"),
    ("epoch > 1 or", 12, "expected a field"),
    ("epoch >= 3 and", 14, "expected a field"),
    ("lr. > 1", 3, "expected a field name right after '.'"),
    ("x in", 4, "expected a value or [list] after 'in'"),
    ("epoch ! 3", 6, "unexpected character '!'"),
    ("metrics[acc] > 1", 8, "expected a quoted key or an integer index"),
    ("epoch in [1, 2", 14, "expected ',' or ']'"),
    ("", 0, "empty expression"),
    ("   ", 0, "empty expression"),
    ("3", 1, "expected a comparison after a constant"),
    ("epoch > > 3", 8, "expected a value after '>'"),
    ("epoch == 1 and and epoch == 2", 15, "expected a field"),
    ("__import__('os').system('true')", 10, "expected 'and', 'or' or the end"),
    ("epoch == 1; import os", 10, "unexpected character ';'"),
]


@pytest.mark.parametrize(("expr", "pos", "message"), BAD)
def test_bad_where_points_at_the_problem(expr: str, pos: int, message: str) -> None:
    with pytest.raises(InvalidQueryError) as ei:
        query.parse_where(expr)
    exc = ei.value
    assert isinstance(exc, ValueError)
    assert exc.position == pos, str(exc)
    assert message in exc.message
    assert f"at column {pos + 1}" in exc.message
    lines = str(exc).splitlines()
    assert lines[-2] == f"  {expr}"
    assert lines[-1] == "  " + " " * pos + "^"


def test_bad_where_in_the_cli_is_one_error_with_a_caret(store_path: Path) -> None:
    rc, out, err = ckpt("ls", RUN, "--store", str(store_path), "--where", "metrics.acc > and epoch >= 3")
    assert rc == 2 and out == ""
    assert "ckpt ls: error: expected a value after '>', found 'and' at column 15" in err
    assert err.splitlines()[-1] == "  " + " " * 14 + "^"


def test_no_eval_on_user_input(store: ckptstore.Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in the query path calls eval/exec/compile, neither in the source nor at run time."""
    for module in (query, md):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not called & {"eval", "exec", "compile", "__import__"}, module.__name__

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("eval/exec/compile called")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, refuse)
    marker = tmp_path / "pwned"
    for expr, _ in WHERE:
        query.select(store, RUN, where=expr, sort="-epoch", columns="ref,metrics.*")
    with pytest.raises(InvalidQueryError):
        query.parse_where(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    assert query.select(store, RUN, where=f"ref == \"__import__('os').system('touch {marker}')\"") == []
    assert not marker.exists()


# hypothesis: random and/or/not trees over comparisons, rendered with the fewest parentheses precedence needs,
# parsed and evaluated, against an evaluation of the tree itself.
FIELDS = ("a", "b", "metrics.c")
OPS: dict[str, Callable[[float, float], bool]] = {
    "==": lambda x, y: x == y, "!=": lambda x, y: x != y, "<": lambda x, y: x < y,
    "<=": lambda x, y: x <= y, ">": lambda x, y: x > y, ">=": lambda x, y: x >= y,
}  # fmt: skip

leaf = st.tuples(st.just("cmp"), st.sampled_from(FIELDS), st.sampled_from(list(OPS)), st.integers(-3, 3))
trees = st.recursive(
    leaf,
    lambda sub: st.one_of(st.tuples(st.just("not"), sub), st.tuples(st.sampled_from(["and", "or"]), sub, sub)),
    max_leaves=12,
)


def render(t: Any, ws: str) -> str:
    kind = t[0]
    if kind == "cmp":
        return f"{t[1]}{ws}{t[2]}{ws}{t[3]}"
    if kind == "not":
        inner = render(t[1], ws)
        return f"not {inner}" if t[1][0] in ("cmp", "not") else f"not ({inner})"
    left, right = render(t[1], ws), render(t[2], ws)
    if kind == "and":  # children that are 'or' need parentheses; 'or' children never do (lowest, associative)
        left = f"({left})" if t[1][0] == "or" else left
        right = f"({right})" if t[2][0] == "or" else right
    else:
        right = f"({right})" if t[2][0] == "or" else right  # keep the tree's shape exactly
    return f"{left} {kind} {right}"


def oracle(t: Any, env: dict[str, int | None]) -> bool:
    kind = t[0]
    if kind == "cmp":
        v = env[t[1]]
        if v is None:
            return t[2] == "!="
        return OPS[t[2]](v, t[3])
    if kind == "not":
        return not oracle(t[1], env)
    if kind == "and":
        return oracle(t[1], env) and oracle(t[2], env)
    return oracle(t[1], env) or oracle(t[2], env)


@settings(max_examples=300, deadline=None)
@given(
    trees, st.sampled_from(["", " ", "  "]), st.fixed_dictionaries({f: st.none() | st.integers(-3, 3) for f in FIELDS})
)
def test_where_matches_a_direct_evaluation(t: Any, ws: str, env: dict[str, int | None]) -> None:
    row: dict[str, Any] = {"metadata": {"metrics": {}}}
    for f, v in env.items():
        if v is not None:
            if f.startswith("metrics."):
                row["metadata"]["metrics"][f.split(".", 1)[1]] = v
            else:
                row["metadata"][f] = v
    text = render(t, ws)
    assert query.parse_where(text)(row) is oracle(t, env), text


@given(st.text(max_size=40))
def test_where_never_fails_other_than_with_a_query_error(text: str) -> None:
    try:
        q = query.parse_where(text)
    except InvalidQueryError as exc:
        assert 0 <= exc.position <= len(text)
        return
    q({"metadata": {"a": 1, "metrics": {"x": 0.5}, "tags": ["t"]}})


@pytest.mark.parametrize("text", ["(" * 5000 + "a" + ")" * 5000, "not " * 5000 + "a", "a and " * 3000 + "a"])
def test_where_nested_thousands_deep_is_a_query_error(text: str) -> None:
    """Found by fuzzing (benchmarks/fuzz_inputs.py): the recursive parser's RecursionError escaped."""
    try:
        query.parse_where(text)
    except InvalidQueryError as exc:
        assert "nested too deeply" in str(exc) or exc.position >= 0
    else:  # a flat chain the parser takes in a loop is fine too
        assert "(" not in text and not text.startswith("not")


def test_huge_expressions_are_refused_at_once_with_a_short_message() -> None:
    """Found by fuzzing: a 100 MB --columns text took minutes and its error message held all of it."""
    huge = "9" * 5_000_000
    for parse in (query.parse_where, query.parse_sort, query.parse_columns):
        with pytest.raises(InvalidQueryError, match="more than 10,000") as ei:
            parse(huge)
        assert len(str(ei.value)) < 1000
    with pytest.raises(InvalidQueryError) as ei:
        query.parse_where("epoch > 1 and " * 500 + "epoch >")  # a long one within the limit: the caret's window
    text = str(ei.value)
    assert len(text) < 1000 and text.splitlines()[-1].endswith("^")


def test_a_path_index_of_thousands_of_digits_is_a_name_not_an_error() -> None:
    """Found by fuzzing: ``lr.<4,300 digits>`` hit int()'s digit limit (ValueError)."""
    long = "9" * 5000
    assert query.parse_path(f"lr.{long}") == ("lr", long)
    assert query.parse_where(f"lr.{long} > 1")({"metadata": {"lr": [1.0]}}) is False
    assert query.parse_path("lr.0") == ("lr", 0)


# ------------------------------------------------------------------------------------------ sort, columns
def test_sort_descending_missing_last_multi_key(store: ckptstore.Store) -> None:
    rows = query.select(store, RUN, sort="-metrics.zeroshot_top1")
    assert [r["step"] for r in rows] == [1600, 2000, 1200, 800, 400]
    rows = query.select(store, RUN, sort="metrics.val/acc,-step")  # only 800 has it; the rest by step, down
    assert [r["step"] for r in rows] == [800, 2000, 1600, 1200, 400]
    rows = query.select(store, RUN, sort="-metrics.val/acc,step")  # missing stays last when descending too
    assert [r["step"] for r in rows] == [800, 400, 1200, 1600, 2000]
    rows = query.select(store, RUN, sort="model:desc,epoch:asc")
    assert [r["step"] for r in rows] == [400, 1200, 2000, 800, 1600]
    rows = query.select(store, RUN, sort="-loss.last")  # NaN last
    assert [r["step"] for r in rows] == [400, 800, 1200, 1600, 2000]
    assert [r["step"] for r in query.select(store, RUN, sort="-epoch", limit=2)] == [2000, 1600]


def test_columns_and_wildcards(store: ckptstore.Store) -> None:
    rows = query.select(store, RUN, where="epoch <= 2", columns="ref,epoch,lr.0,metrics.*,hparams['batch size']")
    assert list(rows[0]) == [
        "ref", "epoch", "lr.0", "metrics.val/acc", "metrics.val_loss", "metrics.zeroshot_top1",
        "hparams['batch size']",
    ]  # fmt: skip
    assert rows[0]["metrics.val/acc"] is None and rows[1]["metrics.val/acc"] == 0.5
    assert rows[1]["lr.0"] == 5e-4 and rows[1]["hparams['batch size']"] == 64


@pytest.mark.parametrize(
    ("kind", "spec"),
    [("sort", "-"), ("sort", "epoch,,step"), ("sort", "lr. "), ("columns", "ref,,epoch"), ("columns", "metrics[x]")],
)
def test_bad_sort_and_columns(store: ckptstore.Store, kind: str, spec: str) -> None:
    with pytest.raises(InvalidQueryError):
        query.select(store, RUN, **{kind: spec})


# ------------------------------------------------------------------------------------- references end to end
REFS = [
    (f"{RUN}@latest", 2000), (RUN, 2000), (f"{RUN}@first", 400), (f"{RUN}@step=1200", 1200), (f"{RUN}@1200", 1200),
    (f"{RUN}@epoch=5", 2000), (f"{RUN}@epoch=2", 800), (f"{RUN}@best:val_loss", 1200),
    (f"{RUN}@best:zeroshot_top1", 1600), (f"{RUN}@best:val_loss:max", 400), (f"{RUN}@best:metrics.zeroshot_top1", 1600),
    (f"{RUN}@tag:final", 2000), ("other@latest", 7),
]  # fmt: skip


@pytest.mark.parametrize(("ref", "step"), REFS)
def test_reference_forms(store_path: Path, store: ckptstore.Store, ref: str, step: int) -> None:
    assert store.resolve(ref).step == step
    assert query.show(store, ref)["step"] == step
    rc, out, err = ckpt("show", ref, "--store", str(store_path), "--json")
    assert rc == 0, err
    assert json.loads(out)["step"] == step
    assert float(store.load(ref)["w"][1]) == float(step if ref.startswith(RUN) else 1)


def test_tag_release_reference_end_to_end(tmp_path: Path) -> None:
    s = ckptstore.create_store(tmp_path / "s")
    for step in (100, 200, 300):
        s.save("r", step, {"w": np.full(4, step, np.float32)}, {"epoch": step // 100})
    with pytest.raises(CheckpointNotFoundError):
        s.resolve("r@tag:release")
    rc, _, err = ckpt("tag", "r@epoch=2", "release", "--store", str(tmp_path / "s"))
    assert rc == 0, err
    rc, out, _ = ckpt("show", "r@tag:release", "--store", str(tmp_path / "s"), "--json")
    assert json.loads(out)["step"] == 200
    rc, _, _ = ckpt("tag", "r@300", "release", "--move", "--store", str(tmp_path / "s"))
    fresh = ckptstore.open_store(tmp_path / "s")
    assert fresh.resolve("r@tag:release").step == 300
    assert "tags" not in fresh.resolve("r@200").metadata


@pytest.mark.parametrize("ref", [f"{RUN}@step=1300", f"{RUN}@epoch=9", f"{RUN}@tag:nope", f"{RUN}@best:nope"])
def test_missing_references_fail_cleanly(store_path: Path, ref: str) -> None:
    rc, out, err = ckpt("show", ref, "--store", str(store_path))
    assert rc == 2 and out == "" and "error:" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- the CLI
def test_ls_where_sort_columns_json(store_path: Path) -> None:
    where = "metrics.zeroshot_top1 > 0.5 and epoch >= 3"
    rc, out, err = ckpt("ls", RUN, "--store", str(store_path), "--where", where, "--sort=-metrics.zeroshot_top1",
                        "--columns", "ref,epoch,metrics.zeroshot_top1", "--json")  # fmt: skip
    assert rc == 0, err
    assert json.loads(out) == [
        {"ref": "clip@1600", "epoch": 4, "metrics.zeroshot_top1": 0.6},
        {"ref": "clip@2000", "epoch": 5, "metrics.zeroshot_top1": 0.58},
        {"ref": "clip@1200", "epoch": 3, "metrics.zeroshot_top1": 0.55},
    ]


def test_ls_json_rows_keep_non_finite_values_valid(store_path: Path) -> None:
    rc, out, _ = ckpt("ls", "--store", str(store_path), "--where", "epoch >= 2", "--json")
    assert rc == 0
    rows = json.loads(out)  # strict JSON: no NaN tokens
    assert [r["ref"] for r in rows] == ["clip@800", "clip@1200", "clip@1600", "clip@2000"]
    assert rows[-1]["metadata"]["loss"]["last"] == {"$float": "nan"}
    assert rows[0]["metadata"]["grad_norm"] == {"$float": "inf"}
    assert "NaN" not in out and "Infinity" not in out


def test_ls_table_with_query(store_path: Path) -> None:
    rc, out, _ = ckpt("ls", RUN, "--store", str(store_path), "--where", "'final' in tags")
    assert rc == 0 and "clip@2000" in out and "clip@1600" not in out
    rc, out, _ = ckpt("ls", "--store", str(store_path), "--columns", "ref,lr,metrics.val_loss", "--sort", "step:desc")
    lines = [line for line in out.splitlines() if "clip@" in line or "other@" in line]
    assert lines[0].split()[0] == "clip@2000" and "0.0002,0.0001" in lines[0] and "0.55" in lines[0]
    assert lines[-1].split()[0] == "other@7"


def test_show_pretty_and_json(store_path: Path) -> None:
    rc, out, _ = ckpt("show", f"{RUN}@epoch=5", "--store", str(store_path))
    assert rc == 0
    assert "loss: last nan, avg 0.22 over 50 steps" in out
    assert "metrics (2):" in out and "zeroshot_top1" in out and "tags: final" in out
    assert "hparams: batch size=64, warmup=100" in out
    rc, out, _ = ckpt("show", f"{RUN}@epoch=5", "--store", str(store_path), "--json")
    got = json.loads(out)
    assert got["metadata"]["metrics"] == {"val_loss": 0.55, "zeroshot_top1": 0.58}
    assert got["metadata"]["loss"]["last"] == {"$float": "nan"}


def test_metrics_table_and_csv(store_path: Path, tmp_path: Path) -> None:
    rc, out, _ = ckpt("metrics", RUN, "--store", str(store_path))
    assert rc == 0
    for name in ("val_loss", "zeroshot_top1", "val/acc", "samples_seen", "loss.last"):
        assert name in out
    assert "5 checkpoints" in out
    target = tmp_path / "m.csv"
    rc, out, _ = ckpt("metrics", RUN, "--store", str(store_path), "-O", str(target))
    assert rc == 0 and "wrote 5 rows" in out
    with target.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ref", "step", "epoch", "samples_seen", "loss.last", "metrics.val/acc",
                             "metrics.val_loss", "metrics.zeroshot_top1"]  # fmt: skip
    assert [int(r["step"]) for r in rows] == list(ROWS)
    assert [float(r["metrics.val_loss"]) for r in rows] == [v[1] for v in ROWS.values()]
    assert rows[0]["metrics.val/acc"] == "" and rows[1]["metrics.val/acc"] == "0.5"
    assert rows[-1]["loss.last"] == "nan"
    rc, out, _ = ckpt("metrics", RUN, "--store", str(store_path), "--csv", "--where", "epoch >= 4")
    assert rc == 0 and out.splitlines()[0].startswith("ref,step,epoch") and len(out.splitlines()) == 3
    rc, out, _ = ckpt("metrics", RUN, "--store", str(store_path), "--json")
    got = json.loads(out)
    assert got["columns"][:3] == ["ref", "step", "epoch"] and len(got["rows"]) == 5


# ------------------------------------------------------------------------------------------- Python API
def test_select_returns_plain_data(store: ckptstore.Store) -> None:
    rows = query.select(store, RUN, where="epoch == 5")
    (row,) = rows
    assert row["ref"] == "clip@2000" and row["run"] == RUN and row["step"] == 2000 and row["epoch"] == 5
    assert math.isnan(row["metadata"]["loss"]["last"])  # decoded back to a float
    json.dumps(rows, allow_nan=True)  # plain data only
    assert {r["run"] for r in query.select(store)} == {RUN, "other"}


def test_dataframe(store: ckptstore.Store) -> None:
    pd = importlib.import_module("pandas")
    df = query.dataframe(store, RUN, sort="-epoch")
    assert isinstance(df, pd.DataFrame)
    assert list(df["step"]) == [2000, 1600, 1200, 800, 400]
    assert list(df["metrics.val_loss"]) == [0.55, 0.5, 0.45, 0.6, 0.9]
    assert math.isnan(df["loss.last"].iloc[0]) and df["hparams.batch size"].iloc[0] == 64
    df = query.dataframe(store, RUN, where="epoch > 9", columns="ref,metrics.val_loss")
    assert list(df.columns) == ["ref", "metrics.val_loss"] and len(df) == 0


def test_dataframe_without_pandas(store: ckptstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError) as ei:
        query.dataframe(store, RUN)
    assert "pandas" in str(ei.value)


def test_metrics_table_function(store: ckptstore.Store) -> None:
    cols, rows = query.metrics_table(store, "other")
    assert cols == ["ref", "step", "epoch", "metrics.val_loss"]
    assert rows == [{"ref": "other@7", "step": 7, "epoch": 1, "metrics.val_loss": 0.1}]
