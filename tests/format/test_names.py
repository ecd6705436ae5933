"""Validation of run names, tensor names and steps (they become storage keys and parts of references)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.errors import InvalidNameError
from ckptstore.format import names
from ckptstore.format.names import check_component, check_run_name, check_step, check_tensor_name
from ckptstore.format.spec import MAX_STEP


@pytest.mark.parametrize("name", ["a", "run", "run_1", "A.b-c", "0", "_x", "x" * 255, "clip-vit.b32_2024"])
def test_valid_run_names(name: str) -> None:
    assert check_run_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".hidden",
        "-x",
        "a/b",
        "a\\b",
        "a b",
        "a@b",
        "a:b",
        "é",
        "x" * 256,
        "run\n",
        "run\x00",
        "\nrun",
        "ru\tn",
        "a*",
        "a?",
    ],
)
def test_invalid_run_names(name: str) -> None:
    with pytest.raises(InvalidNameError) as ei:
        check_run_name(name)
    assert ei.value.hint


@pytest.mark.parametrize("name", [None, 5, b"run", ["run"]])
def test_run_name_must_be_a_string(name: Any) -> None:
    with pytest.raises(InvalidNameError):
        check_run_name(name)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_run_names_are_single_safe_path_segments(name: str) -> None:
    """Whatever is accepted is one harmless path segment."""
    try:
        check_run_name(name)
    except InvalidNameError:
        return
    assert name and name not in (".", "..")
    assert not name.startswith((".", "-"))
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name), repr(name)


@pytest.mark.parametrize(
    "name", ["w", "model/encoder/weight", "optimizer/state/0/exp_avg", "a/é/ü", "a.b/c-d", "$dict/x", "x" * 255 + "/y"]
)
def test_valid_tensor_names(name: str) -> None:
    assert check_tensor_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/a",
        "a/",
        "a//b",
        "a/../b",
        "..",
        ".",
        "./a",
        "a/./b",
        "a\\b",
        "a/b\x00",
        "a/\nb",
        "a/\x7f",
        "x" * 256,
        "a/" + "y" * 256,
        "a/" * 2048 + "a",
    ],
)
def test_invalid_tensor_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        check_tensor_name(name)


def test_tensor_name_not_a_string() -> None:
    with pytest.raises(InvalidNameError):
        check_tensor_name(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("comp", ["..", ".", "", "a/b", "a\\b", "\x01"])
def test_check_component_names_the_full_path(comp: str) -> None:
    with pytest.raises(InvalidNameError) as ei:
        check_component(comp, full=f"model/{comp}")
    assert repr(f"model/{comp}") in str(ei.value)


@pytest.mark.parametrize("step", [0, 1, 123, 10**12, MAX_STEP])
def test_valid_steps(step: int) -> None:
    assert check_step(step) == step


@pytest.mark.parametrize("step", [-1, MAX_STEP + 1, True, False, 1.0, "1", None, 2**70])
def test_invalid_steps(step: Any) -> None:
    with pytest.raises(InvalidNameError):
        check_step(step)


def test_a_name_with_a_lone_surrogate_is_an_invalid_name() -> None:
    """Found by fuzzing (tests/corpus/pt): ``str.encode`` raised UnicodeEncodeError on a state-dict key that
    held a lone surrogate (a .pt key decoded with surrogateescape)."""
    for check in (check_component, check_tensor_name):
        with pytest.raises(InvalidNameError, match="not valid Unicode"):
            check("w\udcff")


def test_names_checked_once_are_remembered_and_bad_ones_never_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "_CHECKED_MAX", 4)
    names._CHECKED_NAMES.clear()
    names._CHECKED_COMPONENTS.clear()
    assert names.check_tensor_name("model/w") == "model/w"
    assert "model/w" in names._CHECKED_NAMES and {"model", "w"} <= names._CHECKED_COMPONENTS
    for bad in ("model/..", "a//b", "x\x00y"):
        with pytest.raises(InvalidNameError):
            names.check_tensor_name(bad)
        with pytest.raises(InvalidNameError):  # refused again: a failure is never remembered
            names.check_tensor_name(bad)
    assert not {"model/..", "a//b", "x\x00y", ".."} & (names._CHECKED_NAMES | names._CHECKED_COMPONENTS)

    class Sneaky(str):  # a str subclass is checked every time, never taken from (or put into) the cache
        pass

    assert names.check_tensor_name(Sneaky("model/w")) == "model/w"
    assert all(type(n) is str for n in names._CHECKED_NAMES)
    for i in range(10):  # bounded
        names.check_tensor_name(f"n{i}")
    assert len(names._CHECKED_NAMES) <= 4 and len(names._CHECKED_COMPONENTS) <= 4
