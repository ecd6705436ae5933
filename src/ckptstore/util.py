"""Small helpers shared across the package (one copy of each): byte sizes, JSON-safe copies, process checks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["human_bytes", "jsonable", "pid_alive"]


def human_bytes(n: float | int | None) -> str:
    """A byte count for people, in powers of 1000: ``"512 B"``, ``"1.5 MB"``; ``"-"`` for ``None``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def jsonable(value: Any, *, other: Callable[[Any], Any] | None = None) -> Any:
    """A copy of ``value`` that JSON can hold: non-finite floats become ``None``, mappings dicts with string keys,
    sequences and sets lists, numpy/torch arrays lists and their scalars Python numbers (duck-typed: no numpy or
    torch import). A value of any other type goes through ``other`` (``str`` for hyper-parameters: a path becomes
    its text), or is kept as it is when ``other`` is None (the caller's ``json.dumps`` decides)."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, other=other) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, other=other) for v in value]
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):
        return jsonable(value.tolist(), other=other)  # an array
    if hasattr(value, "item"):
        return jsonable(value.item(), other=other)  # a numpy or torch scalar
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str):
        return value
    return value if other is None else other(value)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is still running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
