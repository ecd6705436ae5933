"""Shared fixtures of the ckptstore test suite.

Helpers are handed out as fixtures (not imported from here), so test modules stay independent of each other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

Snapshot = dict[str, tuple[int, str]]


def pytest_sessionstart(session: pytest.Session) -> None:
    """``CKPTSTORE_REQUIRE_KERNELS=1`` (set by scripts/test.sh, so CI) makes a missing C extension an error: the
    kernel tests would otherwise skip, and the suite would silently test only the numpy fallback."""
    if os.environ.get("CKPTSTORE_REQUIRE_KERNELS") == "1" and not os.environ.get("CKPTSTORE_NO_KERNELS"):
        from ckptstore.codecs import planes

        if planes.kernels is None:
            raise pytest.UsageError(
                "CKPTSTORE_REQUIRE_KERNELS=1 but ckptstore.codecs._kernels is not built: "
                "run `pip install -e .` (or `python setup.py build_ext --inplace`) in the clone"
            )
        from ckptstore.codecs import native

        if not native.available:
            raise pytest.UsageError(
                "CKPTSTORE_REQUIRE_KERNELS=1 but the batch decoder has no zstd (codecs/native.py binds the "
                "zstandard package's cffi module): install cffi, or rebuild the kernels if they are older than it"
            )


def _snapshot(root: str | os.PathLike[str]) -> Snapshot:
    """Every file under ``root`` (relative path → (size, sha256 of the contents))."""
    root = Path(root)
    out: Snapshot = {}
    if not root.exists():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            data = p.read_bytes()
            out[p.relative_to(root).as_posix()] = (len(data), hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture(scope="session")
def snapshot() -> Callable[[str | os.PathLike[str]], Snapshot]:
    """``snapshot(path)`` lists every file below ``path`` with its size and content hash."""
    return _snapshot


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's name: reproducible, but different per test."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def _bits_equal(a: object, b: object) -> bool:
    """Bit-exact equality of numpy arrays / torch tensors (dtype, shape and raw bytes); NaN payloads count."""
    if type(a).__module__.startswith("torch"):
        import torch

        if not isinstance(b, torch.Tensor):
            return False
        assert isinstance(a, torch.Tensor)
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            return False
        ca, cb = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
        if ca.dtype.is_complex:
            ca, cb = torch.view_as_real(ca).reshape(-1), torch.view_as_real(cb).reshape(-1)
        return bool(ca.view(torch.uint8).numpy().tobytes() == cb.view(torch.uint8).numpy().tobytes())
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        )
    return False


def _assert_same_state(got: object, want: object, path: str = "<root>") -> None:
    """Deep comparison of two states: containers by type and keys (in order), tensors bit-exactly,
    numpy scalars by dtype and bits, floats by bits (so NaN == NaN and -0.0 != 0.0)."""
    import math
    import struct

    if isinstance(want, np.ndarray) or type(want).__module__.startswith("torch"):
        assert _bits_equal(got, want), f"tensor at {path} differs: {got!r} vs {want!r}"
        return
    if isinstance(want, np.generic):
        assert isinstance(got, np.generic) and got.dtype == want.dtype, f"{path}: {got!r} vs {want!r}"
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes() or (np.isnan(want) and np.isnan(got)), (
            f"{path}: {got!r} vs {want!r}"
        )
        return
    if isinstance(want, dict):  # OrderedDict (torch state dicts) comes back as a plain dict, same order
        assert isinstance(got, dict), f"{path}: type {type(got).__name__} vs {type(want).__name__}"
    else:
        assert type(got) is type(want), f"{path}: type {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got.keys()) == list(want.keys()), f"{path}: keys {list(got)} vs {list(want)}"
        for k in want:
            _assert_same_state(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: length {len(got)} vs {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same_state(g, w, f"{path}/{i}")
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r} vs nan"
        else:
            assert struct.pack("<d", got) == struct.pack("<d", want), f"{path}: {got!r} vs {want!r}"
    else:
        assert got == want, f"{path}: {got!r} vs {want!r}"


@pytest.fixture(scope="session")
def assert_same_state() -> Callable[[object, object], None]:
    """``assert_same_state(got, want)``: deep, bit-exact comparison of two checkpoint states."""
    return _assert_same_state


@pytest.fixture(scope="session")
def bits_equal() -> Callable[[object, object], bool]:
    return _bits_equal
