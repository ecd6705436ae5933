"""The batch decoder (codecs/native.py) against the codec chain it accelerates: the same bytes for every chain it
takes, every chain it does not take declined, and every damaged payload left to the chain (status 1), never
decoded to other bytes than the chain's."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore import codecs
from ckptstore.codecs import native
from ckptstore.codecs.base import TensorSpec
from ckptstore.codecs.chain import _finish
from ckptstore.codecs.delta import OrderedDelta
from ckptstore.codecs.planes import CHUNK_BYTES, BytePlanesZstd
from ckptstore.errors import CkptStoreError

pytestmark = pytest.mark.skipif(not native.available, reason="the C kernels were not built (optional extension)")

LAST = BytePlanesZstd(1)
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "int8", "bool"]


def _words(dtype: str, n: int, kind: str, seed: int) -> np.ndarray:
    """Words of a tensor whose planes come out zstd, raw and constant in varying mixes."""
    spec = TensorSpec(dtype, (n,))
    k = spec.dt.itemsize
    rng = np.random.default_rng(seed)
    if kind == "random":
        raw = rng.integers(0, 256, n * k, dtype=np.uint8)
    elif kind == "smooth":  # the high bytes repeat, the low ones vary: zstd, raw and constant planes together
        raw = np.zeros(n * k, dtype=np.uint8)
        raw[::k] = rng.integers(0, 256, n, dtype=np.uint8)
        if k > 1:
            raw[1::k] = rng.integers(0, 4, n, dtype=np.uint8)
    else:  # sparse
        raw = np.where(rng.random(n * k) < 0.05, rng.integers(0, 256, n * k), 0).astype(np.uint8)
    if dtype == "bool":
        raw &= 1
    return raw.view(f"<u{k}")


def _payload(enc: codecs.Encoded) -> bytes:
    return b"".join(bytes(p) for p in enc.parts)


def _decode_native(payload: bytes, records: list[dict[str, Any]], spec: TensorSpec, prev: np.ndarray | None) -> Any:
    planned = native.plan(payload, records, spec, prev)
    assert planned is not None, records
    status = native.decode_many([planned[0]])
    return status, planned[1]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 6000),
    kind=st.sampled_from(["random", "smooth", "sparse"]),
    seed=st.integers(0, 2**16),
)
def test_keyframes_decode_to_the_chains_bytes(dtype: str, n: int, kind: str, seed: int) -> None:
    spec = TensorSpec(dtype, (n,))
    words = _words(dtype, n, kind, seed)
    enc = _finish(words, spec, [], LAST)
    if not enc.codecs:  # stored raw (coding did not pay): not a chain this decoder takes
        assert native.plan(_payload(enc), enc.codecs, spec, None) is None
        return
    status, out = _decode_native(_payload(enc), enc.codecs, spec, None)
    assert status == b"\x00"
    assert out.tobytes() == words.tobytes()
    assert out.tobytes() == codecs.decode(_payload(enc), enc.codecs, spec).tobytes()


def _pair(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prev = rng.standard_normal(n).astype(np.float32)
    cur = (prev * np.float32(0.999) + rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
    p, c = prev.view(np.uint32).copy(), cur.view(np.uint32).copy()
    special = rng.random(n) < 0.01  # NaN payloads, infinities, subnormals, -0.0 among them
    c[special] = rng.integers(0, 2**32, int(special.sum()), dtype=np.uint64).astype(np.uint32)
    return c, p


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 150), predictor=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_deltas_decode_to_the_chains_bytes(rows: int, cols: int, predictor: int, seed: int) -> None:
    n = rows * cols
    spec = TensorSpec("float32", (rows, cols))
    words, prev = _pair(n, seed)
    scales = (1 + np.random.default_rng(seed).standard_normal(rows) * 1e-3).astype(np.float32)
    codec = [
        OrderedDelta("prev"),
        OrderedDelta("scale", float.hex(float(np.float32(0.99951171875)))),
        OrderedDelta("rowscale", rows=rows, scales=scales),
    ][predictor]
    enc = _finish(words, spec, [codec], LAST, prev)
    if not enc.codecs:
        return
    status, out = _decode_native(_payload(enc), enc.codecs, spec, prev)
    assert status == b"\x00"
    assert out.tobytes() == words.tobytes()
    assert out.tobytes() == codecs.decode(_payload(enc), enc.codecs, spec, {"prev": prev}).tobytes()


def test_a_batch_decodes_every_item_and_reports_each() -> None:
    spec = TensorSpec("float32", (3000,))
    items, want = [], []
    for seed in range(6):
        words, prev = _pair(3000, seed)
        delta = seed % 2 == 1
        enc = _finish(words, spec, [OrderedDelta("prev")] if delta else [], LAST, prev if delta else None)
        planned = native.plan(_payload(enc), enc.codecs, spec, prev if delta else None)
        assert planned is not None
        items.append(planned)
        want.append(words)
    bad = bytearray(items[2][0][0])
    bad[0] = 3  # plane count: not this tensor's
    items[2] = ((bytes(bad), *items[2][0][1:]), items[2][1])
    status = native.decode_many([i for i, _ in items])
    assert list(status) == [0, 0, 1, 0, 0, 0]
    for j in (0, 1, 3, 4, 5):
        assert items[j][1].tobytes() == want[j].tobytes()


def test_chains_it_does_not_take_are_declined() -> None:
    spec = TensorSpec("float32", (400,))
    words, prev = _pair(400, 1)
    key = _finish(words, spec, [], LAST)
    dlt = _finish(words, spec, [OrderedDelta("prev")], LAST, prev)
    pk, pd = _payload(key), _payload(dlt)
    assert native.plan(pk, key.codecs, spec, None) is not None
    assert native.plan(pk, key.codecs, spec, prev) is None  # a keyframe has no base
    assert native.plan(pd, dlt.codecs, spec, None) is None  # a delta needs its base
    assert native.plan(pd, dlt.codecs, spec, prev.astype(np.int32)) is None  # base of another width
    assert native.plan(pd, dlt.codecs, spec, prev[:-1]) is None  # base of another size
    assert native.plan(pd, dlt.codecs, TensorSpec("int32", (400,)), prev) is None  # the C delta is float32's
    newer = [dict(r) for r in key.codecs]
    newer[-1]["version"] = BytePlanesZstd.version + 1
    assert native.plan(pk, newer, spec, None) is None  # the chain refuses it with its own message
    assert native.plan(pk, [{"name": "other"}], spec, None) is None
    assert native.plan(pk, [], spec, None) is None  # raw
    c16 = TensorSpec("complex128", (50,))
    assert native.plan(b"\x08" + b"\x00" * 80, [{"name": "planes-zstd", "version": 1}], c16, None) is None


def test_chunked_planes_are_left_to_their_parallel_path() -> None:
    n = CHUNK_BYTES + 1000  # planes longer than a chunk are stored as chunk tables (method 3)
    spec = TensorSpec("float32", (n,))
    words = _words("float32", n, "smooth", 0)
    enc = _finish(words, spec, [], LAST)
    status, _ = _decode_native(_payload(enc), enc.codecs, spec, None)
    assert status == b"\x01"


def _mutations(payload: bytes, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = [payload[:cut] for cut in (0, 1, 5, len(payload) // 2, len(payload) - 1)]
    for pos in [0, 1, 2, 10, 11, *rng.integers(0, len(payload), 12).tolist()]:
        for flip in (0x01, 0x80, 0xFF):
            b = bytearray(payload)
            b[pos] ^= flip
            out.append(bytes(b))
    out.append(payload + b"\x00" * 7)
    return out


@pytest.mark.parametrize("delta", [False, True])
def test_a_damaged_payload_is_left_to_the_chain_or_decodes_as_the_chain_does(delta: bool) -> None:
    """Truncations and flipped bytes anywhere (header, plane lengths, zstd frames, raw planes): the C loop either
    reports the item (the chain then decodes it, raising what is wrong) or gives exactly the chain's bytes."""
    spec = TensorSpec("float32", (2500,))
    words, prev = _pair(2500, 7)
    words[:1200] = words[0]  # a mix of plane methods
    enc = _finish(words, spec, [OrderedDelta("prev")] if delta else [], LAST, prev if delta else None)
    assert enc.codecs
    base = prev if delta else None
    left = decoded = 0
    for bad in _mutations(_payload(enc), 3):
        planned = native.plan(bad, enc.codecs, spec, base)
        if planned is None:
            continue
        (status,) = native.decode_many([planned[0]])
        if status:
            left += 1
            continue
        decoded += 1
        try:
            ref = codecs.decode(bad, enc.codecs, spec, {"prev": base} if base is not None else {})
        except CkptStoreError:
            pytest.fail("decoded a payload the chain refuses")
        assert planned[1].tobytes() == ref.tobytes()
    assert left >= 10 and decoded > 0  # both outcomes were exercised


def test_threads_decode_at_once_with_their_own_zstd_state() -> None:
    spec = TensorSpec("float32", (5000,))
    cases = []
    for seed in range(8):
        words, _ = _pair(5000, seed)
        enc = _finish(words, spec, [], LAST)
        cases.append((_payload(enc), enc.codecs, words))
    errors: list[str] = []

    def work() -> None:
        for _ in range(30):
            planned = [native.plan(p, c, spec, None) for p, c, _ in cases]
            status = native.decode_many([p[0] for p in planned if p is not None])
            for p, (_, _, words), s in zip(planned, cases, status, strict=True):
                if s or p is None or p[1].tobytes() != words.tobytes():
                    errors.append("wrong bytes")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_items_are_a_clear_error() -> None:
    out = np.empty(4, np.uint32)
    with pytest.raises(TypeError):
        native.decode_many([("x",)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="word size"):
        native.decode_many([(b"\x03", 3, out, None, np.zeros(0, np.float32), 0, 0)])
    with pytest.raises(ValueError, match="prev and out"):
        native.decode_many([(b"\x04", 4, out, np.empty(3, np.uint32), np.zeros(0, np.float32), 0, 0)])


@settings(max_examples=300, deadline=None)
@given(
    k=st.sampled_from([1, 2, 4, 8]),
    n=st.integers(1, 300),
    header=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2**64 - 1)), min_size=8, max_size=8),
    body=st.binary(max_size=2000),
    delta=st.booleans(),
)
def test_forged_headers_never_read_past_the_payload(
    k: int, n: int, header: list[tuple[int, int]], body: bytes, delta: bool
) -> None:
    """Any plane count, methods and lengths (up to 2^64 - 1) over any bytes: the loop reports the item or
    decodes it exactly as the chain does; it never reads or writes outside its buffers (a crash fails the run)."""
    import struct

    rng = np.random.default_rng(n)
    fields = [(m, v if v < 4 * len(body) or rng.random() < 0.3 else v % (len(body) + 1)) for m, v in header[:k]]
    payload = bytes([k]) + b"".join(struct.pack("<BQ", m, v) for m, v in fields) + body
    dtype = {1: "uint8", 2: "float16", 4: "float32", 8: "float64"}[k]
    spec = TensorSpec(dtype, (n,))
    prev = np.arange(n, dtype=np.uint32) if delta and k == 4 else None
    records: list[dict[str, Any]] = [{"name": "planes-zstd", "version": 1}]
    if prev is not None:
        records.insert(0, {"name": "delta", "version": 1, "config": {"predictor": "prev"}})
    planned = native.plan(payload, records, spec, prev)
    assert planned is not None
    (status,) = native.decode_many([planned[0]])
    if status == 0:
        ref = codecs.decode(payload, records, spec, {"prev": prev} if prev is not None else {})
        assert planned[1].tobytes() == ref.tobytes()
