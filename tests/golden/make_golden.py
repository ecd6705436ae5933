"""The golden store's checkpoints (deterministic from a seed) and the script that wrote ``tests/golden/v1/``.

``tests/golden/v1/`` was written by ckptstore before the format moved into ``ckptstore.format`` (commit 52d7798):

    PYTHONPATH=<that version's src> python tests/golden/make_golden.py tests/golden/v1

Every later version must read it bit-exactly (tests/golden/test_golden.py). It holds every dtype of format §6.2,
every codec of §10 (raw, planes-zstd, delta with the prev, scale and rowscale predictors), a delta chain longer
than the keyframe interval, a duplicated tensor, a 0-d and an empty tensor, and a deleted checkpoint (step 3:
the checkpoints after it were rebased). :func:`expected` needs only numpy: it gives every tensor as its dtype
name, shape and raw little-endian bytes.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

RUN = "golden"
STEPS = [1, 2, 3, 4, 5, 6]
DELETED = [3]
SEED = 20260615


def _bfloat16_words(values: np.ndarray) -> np.ndarray:
    """bfloat16 words of float32 ``values``: the top half of each float32 (truncated)."""
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2")


def expected() -> dict[int, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """For each step, every tensor of the checkpoint: ``name -> (dtype, shape, raw bytes)``."""
    rng = np.random.default_rng(SEED)
    # Above 4,096 words the writer fits predictors (format §10.5): values halving each step pick "scale" (0.5), rows
    # scaled by different powers of two pick "rowscale". Small integers keep the keyframes a few hundred bytes.
    w = rng.integers(-64, 64, (65, 64)).astype(np.float32)
    emb = rng.integers(-64, 64, (65, 64)).astype(np.float32)
    row_scale = np.float32(2.0) ** -rng.integers(0, 3, (65, 1)).astype(np.float32)
    f64 = rng.standard_normal(24)
    h = rng.standard_normal(24).astype(np.float32)
    const: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for name, np_dtype in [("int64", "<i8"), ("int32", "<i4"), ("int16", "<i2"), ("int8", "<i1"), ("uint64", "<u8"),
                           ("uint32", "<u4"), ("uint16", "<u2"), ("uint8", "<u1"), ("complex64", "<c8"),
                           ("complex128", "<c16")]:  # fmt: skip
        if name.startswith("complex"):
            arr = (rng.standard_normal(24) + 1j * rng.standard_normal(24)).astype(np_dtype)
        else:
            arr = rng.integers(0, 50, 24).astype(np_dtype)
        const[f"const/{name}"] = (name, (4, 6), arr.tobytes())
    const["const/bool"] = ("bool", (24,), (rng.integers(0, 2, 24) == 1).astype("?").tobytes())
    const["const/float8_e4m3fn"] = ("float8_e4m3fn", (32,), rng.integers(0, 0x7F, 32).astype("<u1").tobytes())
    const["const/float8_e5m2"] = ("float8_e5m2", (32,), rng.integers(0, 0x7B, 32).astype("<u1").tobytes())
    const["const/random_int64"] = ("int64", (16,), rng.integers(-(2**62), 2**62, 16).astype("<i8").tobytes())  # raw
    const["const/scalar"] = ("float32", (), np.float32(1.5).tobytes())
    const["const/empty"] = ("float32", (0, 5), b"")
    out = {}
    for step in STEPS:
        noise = rng.standard_normal
        w = (w * np.float32(0.5)).astype(np.float32)
        emb = (emb * row_scale).astype(np.float32)
        f64 = f64 + 1e-12 * noise(f64.shape)
        h = (h + np.float32(1e-3) * noise(h.shape).astype(np.float32)).astype(np.float32)
        ck = dict(const)
        ck["model/w"] = ("float32", w.shape, w.tobytes())
        ck["model/w_copy"] = ck["model/w"]
        ck["model/emb"] = ("float32", emb.shape, emb.tobytes())
        ck["model/f64"] = ("float64", f64.shape, f64.astype("<f8").tobytes())
        ck["model/h16"] = ("float16", h.shape, h.astype("<f2").tobytes())
        ck["model/bf16"] = ("bfloat16", h.shape, _bfloat16_words(h).tobytes())
        ck["model/counter"] = ("int64", (1,), np.array([step * 1000], "<i8").tobytes())
        out[step] = ck
    return out


def _as_value(dtype: str, shape: tuple[int, ...], raw: bytes) -> Any:
    if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import torch

        words = np.frombuffer(raw, "<u2" if dtype == "bfloat16" else "<u1").copy()
        as_int = torch.from_numpy(words.view("<i2" if dtype == "bfloat16" else "<i1"))
        return as_int.view(getattr(torch, dtype)).reshape(shape)
    np_dtype = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bool": "?"}.get(dtype)
    if np_dtype is None:
        np_dtype = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(raw, np_dtype).copy().reshape(shape)


def state(step: int, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> dict[str, Any]:
    nested: dict[str, Any] = {"epoch": step, "lr": 0.1 / step, "name": "golden", "flags": [True, None]}
    for name, (dtype, shape, raw) in tensors.items():
        group, leaf = name.split("/")
        nested.setdefault(group, {})[leaf] = _as_value(dtype, shape, raw)
    return nested


def main(out: str) -> None:
    from ckptstore import create_store

    store = create_store(out)
    for step, tensors in expected().items():
        store.save(RUN, step, state(step, tensors), metadata={"epoch": step, "metrics": {"loss": 1.0 / step}})
    store.delete([f"{RUN}@{s}" for s in DELETED])
    store.gc()
    store.storage.delete(".lock")  # left by the writes; not part of the format


if __name__ == "__main__":
    main(sys.argv[1])
