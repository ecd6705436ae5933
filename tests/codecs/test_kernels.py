"""The optional C kernels against the numpy reference implementation: byte-identical output, every bit pattern.

Each test computes the same thing twice in one process, once through the kernels and once with them switched off
(``kernels = None`` in the codec modules, as ``CKPTSTORE_NO_KERNELS=1`` does), and compares raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptstore.codecs import delta, planes
from ckptstore.codecs.base import TensorSpec
from ckptstore.codecs.delta import OrderedDelta

kernels = planes.kernels
pytestmark = pytest.mark.skipif(kernels is None, reason="the C kernels were not built (optional extension)")


@contextmanager
def numpy_only() -> Iterator[None]:
    saved = planes.kernels, delta.kernels
    planes.kernels = delta.kernels = None
    try:
        yield
    finally:
        planes.kernels, delta.kernels = saved


def _words(seed: int, rows: int, cols: int, special: float) -> tuple[np.ndarray, np.ndarray]:
    """Realistic float32 pairs (a weight and its next version), with a share of arbitrary bit patterns
    (NaN payloads, infinities, subnormals, -0.0) mixed in."""
    rng = np.random.default_rng(seed)
    prev = rng.standard_normal(rows * cols).astype(np.float32)
    cur = (prev * np.float32(0.999) + rng.standard_normal(prev.size).astype(np.float32) * np.float32(1e-3)).astype(
        np.float32
    )
    p, c = prev.view(np.uint32).copy(), cur.view(np.uint32).copy()
    for arr in (p, c):
        mask = rng.random(arr.size) < special
        arr[mask] = rng.integers(0, 2**32, int(mask.sum()), dtype=np.uint64).astype(np.uint32)
    return c, p


def _codecs(rows: int, rng: np.random.Generator) -> list[OrderedDelta]:
    scales = (1 + rng.standard_normal(rows) * 1e-3).astype(np.float32)
    return [
        OrderedDelta("prev"),
        OrderedDelta("scale", float.hex(float(np.float32(0.99951171875)))),
        OrderedDelta("rowscale", rows=rows, scales=scales),
    ]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    special=st.sampled_from([0.0, 0.05, 1.0]),
)
def test_delta_encode_decode_match_numpy(seed: int, rows: int, cols: int, special: float) -> None:
    cur, prev = _words(seed, rows, cols, special)
    spec = TensorSpec("float32", (rows, cols))
    for codec in _codecs(rows, np.random.default_rng(seed)):
        fast = codec.encode(cur, spec, {"prev": prev})
        fused = codec.encode_planes(cur, spec, {"prev": prev})
        back = codec.decode(fast, spec, {"prev": prev})
        with numpy_only():
            ref = codec.encode(cur, spec, {"prev": prev})
            ref_back = codec.decode(ref, spec, {"prev": prev})
            ref_planes = planes.split_planes(ref)
            assert codec.encode_planes(cur, spec, {"prev": prev}) is None  # no fused path without kernels
        assert fast.tobytes() == ref.tobytes(), codec.predictor
        assert fused is not None and fused.tobytes() == ref_planes.tobytes(), codec.predictor
        assert back.tobytes() == ref_back.tobytes() == cur.tobytes(), codec.predictor
        from_planes = codec.decode_planes([np.array(p) for p in fused], spec, {"prev": prev})
        assert from_planes is not None and from_planes.tobytes() == cur.tobytes(), codec.predictor


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=4000), k=st.sampled_from([1, 2, 4, 8]))
def test_split_and_join_planes_match_numpy(data: bytes, k: int) -> None:
    words = np.frombuffer(data[: len(data) // k * k], dtype=f"<u{k}").copy()
    fast = planes.split_planes(words)
    with numpy_only():
        ref = planes.split_planes(words)
        ref_back = planes.join_planes(ref, words.dtype)
    assert fast.tobytes() == ref.tobytes()
    assert planes.join_planes(fast, words.dtype).tobytes() == ref_back.tobytes() == words.tobytes()
    if k == 4:
        out = np.empty_like(words)
        kernels.join_planes4(*[np.array(p) for p in fast], out)
        assert out.tobytes() == words.tobytes()


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=6000), k=st.sampled_from([1, 2, 4, 8]), level=st.sampled_from([1, 3]))
def test_planes_codec_payloads_decode_the_same_with_and_without_kernels(data: bytes, k: int, level: int) -> None:
    words = np.frombuffer(data[: len(data) // k * k], dtype=f"<u{k}").copy()
    words[: words.size // 2] = 0  # some constant and compressible planes besides random ones
    spec = TensorSpec({1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}[k], (words.size,))
    codec = planes.BytePlanesZstd(level)
    payload = codec.encode(words, spec)
    fast = codec.decode(payload, spec)
    with numpy_only():
        assert codec.encode(words, spec) == payload
        ref = codec.decode(payload, spec)
    assert fast.tobytes() == ref.tobytes() == words.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=20000),
    k=st.sampled_from([1, 2, 4, 8]),
    sample=st.sampled_from([1, 7, 1 << 14]),
)
def test_estimate_bits_matches_numpy(data: bytes, k: int, sample: int) -> None:
    words = np.frombuffer(data[: len(data) // k * k], dtype=f"<u{k}").copy()
    fast = planes.estimate_bits(words, sample)
    with numpy_only():
        ref = planes.estimate_bits(words, sample)
    assert fast == ref


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 12), cols=st.integers(1, 300))
def test_row_scales_agree_with_numpy_to_one_ulp(seed: int, rows: int, cols: int) -> None:
    """The kernel sums in another order than numpy's einsum: the float32 scales may differ in the last bit (the
    scale is stored in the payload, so either decodes exactly), never by more."""
    cur, prev = _words(seed, rows, cols, 0.0)
    x, y = cur.view(np.float32), prev.view(np.float32)
    fast = delta._row_scales(x, y, rows)
    with numpy_only():
        ref = delta._row_scales(x, y, rows)
    gap = np.abs(fast.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert int(gap.max()) <= 1


def test_row_scales_of_zero_and_non_finite_rows_are_one() -> None:
    x = np.array([[1, 2], [np.nan, 1], [3, 4]], dtype=np.float32)
    y = np.array([[0, 0], [1, 1], [np.inf, 1]], dtype=np.float32)
    assert delta._row_scales(x.reshape(-1), y.reshape(-1), 3).tolist() == [1.0, 1.0, 1.0]


def test_kernels_refuse_mismatched_buffers() -> None:
    a = np.zeros(8, np.uint32)
    with pytest.raises(ValueError):
        kernels.f32_delta_encode_planes(
            a, np.zeros(7, np.uint32), np.zeros(1, np.float32), 0, 0, *np.zeros((4, 8), np.uint8)
        )
    with pytest.raises(ValueError):  # a plane shorter than the words
        kernels.f32_delta_encode_planes(
            a, np.zeros(8, np.uint32), np.zeros(1, np.float32), 0, 0, *np.zeros((3, 8), np.uint8), np.zeros(7, np.uint8)
        )
    with pytest.raises(ValueError):
        kernels.f32_row_dots(np.zeros(6, np.float32), np.zeros(6, np.float32), 4, np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError):
        kernels.plane_histogram(np.zeros(6, np.uint8), 4, 1, np.zeros(1024, np.int64))


def test_copy_many_copies_every_pair_and_refuses_bad_ones() -> None:
    rng = np.random.default_rng(1)
    srcs = [rng.integers(0, 255, n, dtype=np.uint8) for n in (0, 1, 4097, 3 << 20)]
    srcs.append(rng.standard_normal(1001).astype(np.float32))
    dsts = [np.zeros_like(s) for s in srcs]
    kernels.copy_many([(d, s) for d, s in zip(dsts, srcs, strict=True)])
    assert [d.tobytes() for d in dsts] == [s.tobytes() for s in srcs]
    kernels.copy_many([])
    dst = np.zeros(8, np.uint8)
    for bad, err in (
        ([(dst, np.zeros(9, np.uint8))], ValueError),  # lengths differ
        ([(np.frombuffer(bytes(8), np.uint8), np.zeros(8, np.uint8))], (ValueError, BufferError)),  # read-only dst
        ([(dst, np.zeros(16, np.uint8)[::2])], (ValueError, BufferError)),  # not contiguous
        ([[dst, np.zeros(8, np.uint8)]], TypeError),  # not a tuple
        (5, TypeError),
    ):
        with pytest.raises(err):
            kernels.copy_many(bad)
    # a failure after some pairs were accepted copies nothing at all
    first = np.zeros(4, np.uint8)
    with pytest.raises(ValueError):
        kernels.copy_many([(first, np.ones(4, np.uint8)), (dst, np.zeros(3, np.uint8))])
    assert not first.any()
