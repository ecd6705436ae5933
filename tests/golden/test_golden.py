"""The golden store (``tests/golden/v1``, written by ckptstore before the format moved into ``ckptstore.format``)
read bit-exactly: by this version's Store, and by a minimal reader written from docs/format.md alone."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from make_golden import DELETED, RUN, STEPS, expected

GOLDEN = Path(__file__).parent / "v1"
KEPT = [s for s in STEPS if s not in DELETED]
EXPECTED = expected()
WIDTH = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 8,
}  # fmt: skip  (word width k, §6.2: complex128 is 2 u64 words)
FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


# ----------------------------------------------------------------------- a reader from docs/format.md alone


class SpecReader:
    """Reads a store following docs/format.md §3-§11, with numpy, zstandard and xxhash only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        info = json.loads((root / "ckptstore.json").read_text())  # §3
        assert info["format"] == "ckptstore" and int(info["version"]) <= 1

    def steps(self, run: str) -> list[int]:  # §2: runs/<run>/ckpt/<step:020d>.json
        return sorted(int(p.stem) for p in (self.root / "runs" / run / "ckpt").glob("*.json"))

    def manifest(self, run: str, step: int) -> dict[str, Any]:
        m: dict[str, Any] = json.loads((self.root / "runs" / run / "ckpt" / f"{step:020d}.json").read_bytes())
        assert m["kind"] == "ckptstore.manifest" and m["run"] == run and m["step"] == step  # §4.2
        return m

    def tensor(self, m: dict[str, Any], name: str) -> bytes:  # §11
        words = self.decode(m, m["tensors"][name]["object"], frozenset())
        return words.astype(words.dtype.newbyteorder("<")).tobytes()

    def decode(self, m: dict[str, Any], oid: str, visiting: frozenset[str]) -> np.ndarray:
        assert oid not in visiting, "reference cycle"
        rec = m["objects"][oid]
        k = WIDTH[rec["dtype"]]
        n = int(np.prod(rec["shape"], dtype=np.int64)) * (2 if rec["dtype"] == "complex128" else 1)
        refs = {role: self.decode(m, ref, visiting | {oid}) for role, ref in rec.get("refs", {}).items()}
        payload = b""
        if rec["length"]:
            with open(self.root / rec["pack"], "rb") as f:
                assert f.read(8) == b"CKPTPACK" and struct.unpack("<I", f.read(4))[0] <= 1  # §9
                f.seek(rec["offset"])
                payload = f.read(rec["length"])
            assert len(payload) == rec["length"]
        word = np.dtype(f"<u{k}")
        if not rec["codecs"]:  # §10.2
            assert len(payload) == n * k
            return np.frombuffer(payload, word).copy()
        *array_codecs, last = rec["codecs"]
        assert last["name"] == "planes-zstd" and all(c["name"] == "delta" for c in array_codecs)  # §10.1
        view = memoryview(payload)
        sides = []
        for c in array_codecs:  # side data at the head of the payload, in chain order
            if c.get("config", {}).get("side"):
                (length,) = struct.unpack_from("<Q", view, 0)
                sides.append(bytes(view[8 : 8 + length]))
                view = view[8 + length :]
            else:
                sides.append(b"")
        words = planes_decode(bytes(view), k, n)
        for c, side in zip(reversed(array_codecs), reversed(sides), strict=True):
            words = delta_decode(words, refs["prev"], rec["dtype"], c.get("config", {}), side)
        return words


def planes_decode(payload: bytes, k: int, n: int) -> np.ndarray:
    """§10.3: u8 nplanes; nplanes x (u8 method, u64 value); plane data; word j = sum plane[i][j] << 8i."""
    assert payload[0] == k
    pos = 1 + 9 * k
    planes = []
    for i in range(k):
        method, value = struct.unpack_from("<BQ", payload, 1 + 9 * i)
        if method == 0:
            assert value == n
            planes.append(np.frombuffer(payload, np.uint8, n, pos))
            pos += n
        elif method == 1:
            plane = zstandard.ZstdDecompressor().decompress(payload[pos : pos + value])
            assert len(plane) == n
            planes.append(np.frombuffer(plane, np.uint8))
            pos += value
        else:
            assert method == 2
            planes.append(np.full(n, value, np.uint8))
    out = np.zeros(n, np.dtype(f"<u{k}"))
    for i, plane in enumerate(planes):
        out |= plane.astype(out.dtype) << np.uint64(8 * i).astype(out.dtype)
    return out


def ordered(x: np.ndarray, bits: int) -> np.ndarray:
    """§10.4 ord(): flip every bit but the sign of negative floats (its own inverse)."""
    top = x.dtype.type(1 << (bits - 1))
    return np.where(x & top != 0, x ^ x.dtype.type((1 << (bits - 1)) - 1), x)


def predict(p: np.ndarray, dtype: str, a: np.ndarray) -> np.ndarray:
    """§10.4 scale prediction, ``a`` a binary32 (rowscale) or binary64 (scale) factor per word."""
    if dtype == "float32":
        return (p.view("<f4") * a.astype(np.float32)).view("<u4")
    if dtype == "float64":
        return (p.view("<f8") * a.astype(np.float64)).view("<u8")
    if dtype == "float16":
        return (p.view("<f2") * a.astype(np.float16)).view("<u2")
    assert dtype == "bfloat16"
    g = ((p.astype(np.uint32) << np.uint32(16)).view("<f4") * a.astype(np.float32)).view("<u4")
    b = g + np.uint32(0x7FFF) + ((g >> np.uint32(16)) & np.uint32(1))
    return (b >> np.uint32(16)).astype("<u2")


def delta_decode(z: np.ndarray, p: np.ndarray, dtype: str, config: dict[str, Any], side: bytes) -> np.ndarray:
    """§10.4: r = unzigzag(z); v = r + pred; out = ord(v) for floats."""
    bits = 8 * z.dtype.itemsize
    one = z.dtype.type(1)
    with np.errstate(over="ignore"):
        kind = config.get("predictor", "prev")
        if kind == "prev":
            pred = p
        elif kind == "scale":
            pred = predict(p, dtype, np.full(p.size, float.fromhex(config["scale"])))
        else:
            assert kind == "rowscale"
            scales = np.frombuffer(side, "<f4")
            assert scales.size == config["rows"] and p.size % scales.size == 0
            pred = predict(p, dtype, np.repeat(scales, p.size // scales.size))
        if dtype in FLOATS:
            pred = ordered(pred, bits)
        r = (z >> one) ^ (z.dtype.type(0) - (z & one))
        v = r + pred
    return ordered(v, bits) if dtype in FLOATS else v


def object_id(dtype: str, shape: list[int], raw: bytes) -> str:  # §7
    return "xxh128:" + xxhash.xxh3_128(f"{dtype}:{','.join(map(str, shape))}:".encode() + raw).hexdigest()


def test_spec_reader_reads_the_golden_store_bit_exactly() -> None:
    reader = SpecReader(GOLDEN)
    assert reader.steps(RUN) == KEPT
    for step in KEPT:
        m = reader.manifest(RUN, step)
        assert set(m["tensors"]) == set(EXPECTED[step])
        for name, (dtype, shape, raw) in EXPECTED[step].items():
            t = m["tensors"][name]
            assert (t["dtype"], tuple(t["shape"])) == (dtype, shape)
            assert reader.tensor(m, name) == raw, f"{RUN}@{step} {name}"
            assert t["object"] == object_id(dtype, list(shape), raw)
        assert m["metadata"]["epoch"] == step


def test_golden_store_covers_every_codec_and_dtype() -> None:
    seen_codecs, seen_dtypes, depths = set(), set(), set()
    for step in KEPT:
        m = SpecReader(GOLDEN).manifest(RUN, step)
        for rec in m["objects"].values():
            seen_dtypes.add(rec["dtype"])
            depths.add(rec.get("depth", 0))
            names = [(c["name"], c.get("config", {}).get("predictor")) for c in rec["codecs"]]
            seen_codecs.add(tuple(names))
    assert set(WIDTH) == seen_dtypes
    assert {(), (("planes-zstd", None),)} <= seen_codecs
    assert {(("delta", p), ("planes-zstd", None)) for p in ("prev", "scale", "rowscale")} <= seen_codecs
    assert max(depths) >= 2  # a delta chain


# ----------------------------------------------------------------------------------- this version's Store


def raw_bytes(value: Any) -> bytes:
    if type(value).__module__.startswith("torch"):
        import torch

        flat = value.contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(value).tobytes()


def test_store_reads_the_golden_store_bit_exactly(tmp_path: Path) -> None:
    from ckptstore import open_store

    pytest.importorskip("torch")
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)  # reading takes the store's lock file: never write into tests/
    store = open_store(copy)
    assert store.steps(RUN) == KEPT
    defaults = {"keyframe_interval": 4, "zstd_level": 1, "codec": "planes-zstd", "layout": "dense"}
    assert store.settings == defaults
    for step in KEPT:
        state = store.load(f"{RUN}@{step}")
        assert state["epoch"] == step and state["lr"] == 0.1 / step and state["flags"] == [True, None]
        for name, (_dtype, shape, raw) in EXPECTED[step].items():
            group, leaf = name.split("/")
            value = state[group][leaf]
            assert tuple(value.shape) == shape and raw_bytes(value) == raw, f"{RUN}@{step} {name}"
    report = store.verify()
    assert report["ok"] and report["checkpoints"] == len(KEPT)


# ------------------------------------------------------------------------------------- spec test vectors


@pytest.mark.parametrize(
    ("dtype", "shape", "values", "oid"),
    [
        ("float32", [2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "xxh128:2e66a57a219cfda0f959224815cd0fd9"),
        ("float32", [], [1.5], "xxh128:6eb2fa883bc34a683998e1671a86155d"),
        ("float32", [0, 5], [], "xxh128:d6af752e2dd8d608528f9bc67dff0293"),
    ],
)
def test_object_id_vectors_of_section_7(dtype: str, shape: list[int], values: list[float], oid: str) -> None:
    from ckptstore.format import tree
    from ckptstore.format.manifest import object_id as ckpt_object_id

    raw = np.array(values, "<f4").tobytes()
    assert object_id(dtype, shape, raw) == oid
    leaf = tree.Leaf.from_numpy(np.array(values, np.float32).reshape(shape))
    assert ckpt_object_id(leaf) == oid


def test_planes_example_of_section_10_3() -> None:
    from ckptstore.codecs import TensorSpec
    from ckptstore.codecs.planes import BytePlanesZstd

    payload = bytes.fromhex("04" + "001000000000000000" + "020000000000000000" * 3) + bytes(range(16))
    assert len(payload) == 53
    words = np.arange(16, dtype="<u4")
    assert np.array_equal(planes_decode(payload, 4, 16), words)
    assert BytePlanesZstd().encode(words, TensorSpec("int32", (16,))) == payload


def test_delta_vectors_of_section_10_4() -> None:
    """The worked example (float32, predictor prev): cur, prev and the stored word, as docs/format.md lists them."""
    from ckptstore.codecs import TensorSpec
    from ckptstore.codecs.delta import OrderedDelta

    rows = docs_table("Worked example (float32, predictor `prev`):")
    cur = np.array([int(r[0], 16) for r in rows], "<u4")
    prev = np.array([int(r[1], 16) for r in rows], "<u4")
    stored = np.array([int(r[2], 16) for r in rows], "<u4")
    assert len(rows) == 4
    assert np.array_equal(delta_decode(stored, prev, "float32", {"predictor": "prev"}, b""), cur)
    assert np.array_equal(OrderedDelta("prev").encode(cur, TensorSpec("float32", (4,)), {"prev": prev}), stored)


def docs_table(caption: str) -> list[tuple[str, str, str]]:
    """(cur, prev, stored word) in hex from the table after ``caption`` in docs/format.md."""
    text = (Path(__file__).parents[2] / "docs" / "format.md").read_text()
    lines = text[text.index(caption) :].splitlines()[4:]
    out = []
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.append((cells[0].split("`")[1], cells[1].split("`")[1], cells[5].strip("`")))
    return out
