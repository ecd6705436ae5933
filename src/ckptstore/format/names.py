"""Validation of run names, tensor names and steps: they become parts of storage keys and of references."""

from __future__ import annotations

import re

from ckptstore.errors import InvalidNameError
from ckptstore.format.spec import MAX_NAME_LENGTH, MAX_STEP, MAX_TENSOR_NAME_LENGTH

_RUN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_BAD_COMPONENT_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


def check_run_name(name: str) -> str:
    """A run name is one path segment: letters, digits, ``_ . -``, not starting with ``.`` or ``-``."""
    if not isinstance(name, str) or not _RUN_RE.fullmatch(name) or len(name.encode()) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"invalid run name {name!r}",
            hint="use letters, digits, '_', '.', '-' (not first), at most 255 bytes",
        )
    return name


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (found by fuzzing a .pt): no file or JSON name can hold it
        raise InvalidNameError(
            f"tensor name {where.encode('utf-8', 'backslashreplace').decode()[:80]!r} is not valid Unicode",
            hint="rename the key in the state dict before saving",
        ) from None


# Names that passed the checks: a training loop saves the same few hundred names every time, and checking them
# again is a measurable part of an async save's stall. Bounded: cleared when it grows past a size no real state has.
_CHECKED_COMPONENTS: set[str] = set()
_CHECKED_NAMES: set[str] = set()
_CHECKED_MAX = 1 << 16


def _remember(checked: set[str], text: str) -> None:
    if len(checked) >= _CHECKED_MAX:
        checked.clear()
    checked.add(text)


def check_component(component: str, *, full: str | None = None) -> str:
    """One component of a tensor name (a state-dict key). Rejects path tricks such as ``..`` and separators."""
    if type(component) is str and component in _CHECKED_COMPONENTS:
        return component
    where = full if full is not None else component
    if component in ("", ".", ".."):
        raise InvalidNameError(
            f"unsafe tensor name {where!r}: empty, '.' or '..' component",
            hint="rename the key in the state dict before saving",
        )
    if _BAD_COMPONENT_CHARS.search(component):
        raise InvalidNameError(
            f"unsafe tensor name {where!r}: contains '/', '\\' or a control character",
            hint="rename the key in the state dict before saving",
        )
    if len(_utf8(component, where)) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"tensor name component longer than {MAX_NAME_LENGTH} bytes: {where[:80]!r}...")
    if type(component) is str:  # (a str subclass could compare equal to another text)
        _remember(_CHECKED_COMPONENTS, component)
    return component


def check_tensor_name(name: str) -> str:
    """A tensor name is its path in the state tree, components joined by ``/``."""
    if type(name) is str and name in _CHECKED_NAMES:
        return name
    if not isinstance(name, str) or len(_utf8(name, name)) > MAX_TENSOR_NAME_LENGTH:
        raise InvalidNameError(f"tensor name too long or not a string: {str(name)[:80]!r}")
    for part in name.split("/"):
        check_component(part, full=name)
    if type(name) is str:
        _remember(_CHECKED_NAMES, name)
    return name


def check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or step > MAX_STEP:
        raise InvalidNameError(f"invalid step {step!r}", hint="a step is an integer >= 0")
    return step
