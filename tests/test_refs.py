"""Checkpoint references: every form parses, prints back, and resolves (on plain entries and on a real store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore.errors import CheckpointNotFoundError, InvalidReferenceError
from ckptstore.refs import Ref, parse_ref, resolve

PARSES = [
    ("RUN@123", Ref("RUN", "step", 123)),
    ("RUN@0", Ref("RUN", "step", 0)),
    ("RUN@step=123", Ref("RUN", "step", 123)),
    ("RUN@epoch=5", Ref("RUN", "epoch", 5)),
    ("RUN@latest", Ref("RUN", "latest")),
    ("RUN@first", Ref("RUN", "first")),
    ("RUN@tag:x", Ref("RUN", "tag", "x")),
    ("RUN@tag:release-1.0", Ref("RUN", "tag", "release-1.0")),
    ("RUN@best:val_loss", Ref("RUN", "best", "val_loss", None)),
    ("RUN@best:acc:max", Ref("RUN", "best", "acc", "max")),
    ("RUN@best:acc:min", Ref("RUN", "best", "acc", "min")),
    ("RUN@best:metrics.val/loss", Ref("RUN", "best", "metrics.val/loss", None)),
    ("RUN", Ref("RUN", "latest")),
    ("clip-vit_b.32", Ref("clip-vit_b.32", "latest")),
    ("r@00042", Ref("r", "step", 42)),
]


@pytest.mark.parametrize(("text", "ref"), PARSES)
def test_parse(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(("text", "ref"), PARSES)
def test_str_parses_back_to_the_same_ref(text: str, ref: Ref) -> None:
    assert parse_ref(str(ref)) == ref


BAD = [
    "",
    "@5",
    "RUN@",
    "RUN@-1",
    "RUN@abc",
    "RUN@step=",
    "RUN@step=x",
    "RUN@step=-3",
    "RUN@epoch=",
    "RUN@epoch=x",
    "RUN@best:",
    "RUN@best:acc:avg",
    "RUN@tag:",
    "RUN@tag:a b",
    "RUN@latest2",
    "RUN@1@2",
    "bad name@1",
    ".hidden@1",
    "-x@1",
    "RUN@ 5",
    "RUN@5 ",
    "a/b@1",
    "../x@latest",
    "RUN@LATEST",
    "RUN@5\n",
    "RUN\n@5",
    "RUN\n",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_refs_raise_with_hint(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as ei:
        parse_ref(text)
    assert ei.value.hint, f"no hint for {text!r}"
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("value", [None, 5, b"RUN@5"])
def test_non_string_refs_raise(value: Any) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_ref(value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20))
def test_parse_never_crashes_and_round_trips(text: str) -> None:
    try:
        ref = parse_ref(text)
    except InvalidReferenceError:
        return
    assert parse_ref(str(ref)) == ref


# ---------------------------------------------------------------------------------------------- resolve
ENTRIES: list[dict[str, Any]] = [
    {"step": 10, "metadata": {"epoch": 1, "metrics": {"val_loss": 0.5, "acc": 0.1, "err": 0.9}, "tags": ["a"]}},
    {"step": 20, "metadata": {"epoch": 2, "metrics": {"val_loss": 0.2, "acc": 0.3, "err": 0.4}}},
    {
        "step": 30,
        "metadata": {"epoch": 2, "metrics": {"val_loss": 0.3, "acc": 0.7, "err": float("nan")}, "tags": ["a", "b"]},
    },
    {"step": 40, "metadata": {"epoch": 3, "metrics": {"val_loss": None, "acc": True}, "eval": {"top1": 0.9}}},
]


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("r@10", 10),
        ("r@step=30", 30),
        ("r@latest", 40),
        ("r", 40),
        ("r@first", 10),
        ("r@epoch=1", 10),
        ("r@epoch=2", 30),
        ("r@epoch=3", 40),
        ("r@tag:a", 30),
        ("r@tag:b", 30),
        ("r@best:val_loss", 20),
        ("r@best:val_loss:max", 10),
        ("r@best:acc", 30),
        ("r@best:acc:min", 10),
        ("r@best:acc:max", 30),
        ("r@best:err", 20),  # nan is ignored; 'err' means lower is better
        ("r@best:eval.top1", 40),  # dotted path into the metadata
    ],
)
def test_resolve(text: str, step: int) -> None:
    assert resolve(parse_ref(text), ENTRIES) == step


@pytest.mark.parametrize("text", ["r@15", "r@epoch=9", "r@tag:zzz", "r@best:nope", "r@best:metrics"])
def test_resolve_missing(text: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        resolve(parse_ref(text), ENTRIES)


@pytest.mark.parametrize("text", ["r", "r@first", "r@5", "r@best:acc"])
def test_resolve_empty_run(text: str) -> None:
    with pytest.raises(CheckpointNotFoundError) as ei:
        resolve(parse_ref(text), [])
    assert isinstance(ei.value, KeyError)


# ---------------------------------------------------------------------------------------------- on a store
@pytest.fixture
def store(tmp_path: Path) -> ckptstore.Store:
    s = ckptstore.create_store(tmp_path / "s")
    x = np.arange(64, dtype=np.float32)
    for e in ENTRIES:
        metrics = e["metadata"]["metrics"]  # the schema (docs/metadata.md) refuses NaN and bools as metrics
        meta = {**e["metadata"], "metrics": {k: v for k, v in metrics.items() if v == v and not isinstance(v, bool)}}
        s.save("r", e["step"], {"x": x + e["step"]}, meta)
    s.save("other", 99, {"x": x}, {"epoch": 1})
    return s


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("r@10", 10),
        ("r@step=30", 30),
        ("r@latest", 40),
        ("r", 40),
        ("r@first", 10),
        ("r@epoch=2", 30),
        ("r@tag:a", 30),
        ("r@best:val_loss", 20),
        ("r@best:acc:min", 10),
        ("r@best:eval.top1", 40),
        ("other", 99),
        ("other@epoch=1", 99),
    ],
)
def test_store_resolve(store: ckptstore.Store, text: str, step: int) -> None:
    m = store.resolve(text)
    assert m.step == step
    assert m.run == parse_ref(text).run
    assert store.load(text)["x"][0] == np.float32(step if m.run == "r" else 0)


def test_store_resolve_accepts_ref_objects(store: ckptstore.Store) -> None:
    assert store.resolve(Ref("r", "step", 20)).step == 20


@pytest.mark.parametrize("text", ["r@11", "nope", "nope@1", "r@tag:zzz", "r@epoch=7", "r@best:unknown"])
def test_store_resolve_missing(store: ckptstore.Store, text: str) -> None:
    with pytest.raises(CheckpointNotFoundError) as ei:
        store.resolve(text)
    assert "@" in str(ei.value)


@pytest.mark.parametrize("text", ["r@", "r@x", "../r@1", ""])
def test_store_resolve_bad(store: ckptstore.Store, text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        store.resolve(text)


def test_a_step_of_thousands_of_digits_is_a_reference_error() -> None:
    """Found by fuzzing: int() refused the 5,000-digit number with a ValueError of its own."""

    for text in ("r@" + "9" * 5000, "r@epoch=" + "1" * 30, "r@step=" + "7" * 21):
        with pytest.raises(InvalidReferenceError, match="digits"):
            parse_ref(text)
    assert parse_ref("r@" + "9" * 18).value == int("9" * 18)
