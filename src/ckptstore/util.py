"""Small helpers shared by the CLI, release, the demo and the integrations (one copy of each)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["human_bytes", "pid_alive"]


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
