"""Codecs: every dtype, shape and bit pattern encodes and decodes to identical bytes, with and without references.

Equality is always on raw bytes (``.tobytes()``), never on float values, so NaN payloads and -0.0 count.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptstore import codecs
from ckptstore.codecs import planes as planes_mod
from ckptstore.codecs.base import ArrayCodec, TensorSpec, from_record, register, registered
from ckptstore.codecs.chain import RAW_MAX_BYTES, bytes_codec
from ckptstore.codecs.chain import _finish as finish
from ckptstore.codecs.chain import _span_encoder as span_encoder
from ckptstore.codecs.delta import OrderedDelta, to_ordered, unzigzag, zigzag
from ckptstore.codecs.planes import CONST, RAW, ZSTD, ZSTD_CHUNKS, BytePlanesZstd, estimate_bits
from ckptstore.errors import CodecError
from ckptstore.format.dtypes import DTYPES

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ALL_DTYPES = sorted(DTYPES)
FLOAT_LAYOUT = {  # exponent bits, mantissa bits of the IEEE-like float formats
    "float64": (11, 52),
    "float32": (8, 23),
    "float16": (5, 10),
    "bfloat16": (8, 7),
    "float8_e4m3fn": (4, 3),
    "float8_e5m2": (5, 2),
}


def word_dtype(name: str) -> np.dtype:
    return np.dtype("<u8") if name == "complex128" else DTYPES[name].word


def special_words(name: str) -> list[int]:
    """Bit patterns that break naive codecs: NaN payloads, ±0, ±inf, subnormals, extremes, sign bits."""
    bits = word_dtype(name).itemsize * 8
    sign = 1 << (bits - 1)
    out = {0, 1, sign, sign - 1, sign + 1, (1 << bits) - 1, (1 << bits) - 2}
    if name in FLOAT_LAYOUT:
        e, m = FLOAT_LAYOUT[name]
        exp_all = ((1 << e) - 1) << m
        out |= {
            exp_all,
            exp_all | sign,  # ±inf (a NaN for float8_e4m3fn)
            exp_all | 1,
            exp_all | (1 << (m - 1)),
            exp_all | ((1 << m) - 1),  # sNaN / qNaN / all-payload NaN
            sign | exp_all | 1,
            sign | exp_all | ((1 << m) - 1),  # negative NaNs
            1,
            (1 << m) - 1,
            sign | 1,
            sign | ((1 << m) - 1),  # subnormals
            exp_all - 1,
            sign | (exp_all - 1),  # largest finite
            1 << m,  # smallest normal
        }
    return sorted(out)


def smooth_words(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Words of realistic-looking values (compressible exponents), any dtype."""
    wd = word_dtype(name)
    vals = rng.standard_normal(n) * 0.05
    if name in ("float64", "complex128", "complex64"):
        return np.ascontiguousarray(vals).view("<u8").astype(wd) if wd.itemsize == 8 else vals.view(wd)
    if name == "float32":
        return vals.astype("<f4").view(wd)
    if name == "float16":
        return vals.astype("<f2").view(wd)
    if name == "bfloat16":
        return (vals.astype("<f4").view("<u4") >> 16).astype(wd)
    if name.startswith("float8"):
        return (vals.astype("<f2").view("<u2") >> 8).astype(wd)
    if name == "bool":
        return (rng.random(n) < 0.1).astype(wd)
    return (rng.integers(-50, 50, n) + 1000).astype(wd)


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[str] | None = None, max_side: int = 24) -> tuple[np.ndarray, TensorSpec]:
    name = draw(st.sampled_from(dtypes or ALL_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=0, max_size=3)))
    spec = TensorSpec(name, shape)
    n = spec.size
    wd = word_dtype(name)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["random", "smooth", "const", "few"]))
    if kind == "random":
        words = np.frombuffer(rng.bytes(n * wd.itemsize), dtype=wd).copy()
        if name == "bool":
            words &= 1
    elif kind == "smooth":
        words = smooth_words(name, n, rng)
    elif kind == "const":
        words = np.full(n, draw(st.sampled_from(special_words(name))), dtype=wd)
    else:
        pool = np.array(special_words(name), dtype=wd)
        words = pool[rng.integers(0, len(pool), n)] if n else np.empty(0, wd)
    if n and name != "bool":
        specials = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(special_words(name))), max_size=6))
        for i, w in specials:
            words[i] = w
    return np.ascontiguousarray(words, dtype=wd), spec


def near(words: np.ndarray, spec: TensorSpec, rng: np.random.Generator, frac: float = 0.3) -> np.ndarray:
    """A nearby tensor: a fraction of the words moved by a few units in the last place."""
    out = words.copy()
    if out.size == 0:
        return out
    idx = rng.random(out.size) < frac
    if spec.dtype == "bool":
        out[idx] ^= 1
    else:
        out[idx] ^= rng.integers(1, 8, int(idx.sum())).astype(out.dtype)
    return out


def roundtrip(words: np.ndarray, spec: TensorSpec, refs: dict[str, np.ndarray] | None = None) -> codecs.Encoded:
    enc = codecs.encode(words, spec, refs)
    assert set(enc.roles) <= {"prev"}
    used = {r: refs[r] for r in enc.roles} if refs else None
    dec = codecs.decode(enc.payload, enc.codecs, spec, used)
    assert dec.dtype.itemsize == words.dtype.itemsize
    assert dec.size == words.size
    assert dec.tobytes() == words.tobytes(), f"{spec} codecs={enc.codecs}"
    if not enc.roles:
        # keyframes and raw objects decode without any reference
        assert codecs.decode(enc.payload, enc.codecs, spec).tobytes() == words.tobytes()
    else:
        with pytest.raises(CodecError):
            codecs.decode(enc.payload, enc.codecs, spec, {})
    assert len(enc.payload) <= words.nbytes  # never larger than raw
    return enc


# ---------------------------------------------------------------------------------------------- properties
@HYP
@given(t=tensors())
def test_keyframe_roundtrip(t: tuple[np.ndarray, TensorSpec]) -> None:
    words, spec = t
    enc = roundtrip(words, spec)
    assert enc.is_keyframe


@HYP
@given(t=tensors(), seed=st.integers(0, 2**32 - 1), how=st.sampled_from(["random", "near", "same", "sparse"]))
def test_roundtrip_with_reference(t: tuple[np.ndarray, TensorSpec], seed: int, how: str) -> None:
    words, spec = t
    rng = np.random.default_rng(seed)
    if how == "random":
        prev = np.frombuffer(rng.bytes(words.nbytes), dtype=words.dtype).copy()
    elif how == "near":
        prev = near(words, spec, rng)
    elif how == "sparse":
        prev = near(words, spec, rng, frac=0.02)
    else:
        prev = words.copy()
    enc = roundtrip(words, spec, {"prev": prev})
    if how == "same" and spec.size >= 16 and spec.nbytes > RAW_MAX_BYTES and estimate_bits(words) > 0:
        # identical reference: a delta costs nothing, so it must be chosen over a keyframe (tiny tensors are raw)
        assert not enc.is_keyframe, enc.codecs
        assert len(enc.payload) < words.nbytes


@HYP
@given(
    t=tensors(dtypes=["float32", "float64", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
    decay=st.sampled_from([0.999, 0.9999, 0.5, 1.0000001, 2.0]),
)
def test_roundtrip_scaled_reference(t: tuple[np.ndarray, TensorSpec], seed: int, decay: float) -> None:
    """Weight-decay-like motion (cur ≈ a·prev) exercises the scale predictor, including NaN/inf inputs."""
    cur, spec = t
    rng = np.random.default_rng(seed)
    if spec.dtype == "bfloat16":
        f = (cur.astype(np.uint32) << 16).view("<f4")
        prev = ((f / np.float32(decay)).view("<u4") >> 16).astype(np.uint16)
    else:
        f = cur.view(f"<f{cur.dtype.itemsize}")
        with np.errstate(all="ignore"):
            prev = (f / f.dtype.type(decay)).view(cur.dtype)
    prev = near(prev, spec, rng, frac=0.05)
    roundtrip(cur, spec, {"prev": prev})


@HYP
@given(
    t=tensors(max_side=16),
    length=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    frac=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
)
def test_delta_chain(t: tuple[np.ndarray, TensorSpec], length: int, seed: int, frac: float) -> None:
    """x1 against x0, x2 against x1 ...; decode walks the chain using only what it decoded itself."""
    x0, spec = t
    rng = np.random.default_rng(seed)
    xs = [x0]
    for _ in range(length):
        xs.append(near(xs[-1], spec, rng, frac))
    encoded = [codecs.encode(xs[0], spec)]
    for prev, cur in itertools.pairwise(xs):
        encoded.append(codecs.encode(cur, spec, {"prev": prev}))
    decoded: list[np.ndarray] = []
    for enc in encoded:
        refs = {"prev": decoded[-1]} if enc.roles else None
        decoded.append(codecs.decode(enc.payload, enc.codecs, spec, refs))
    for i, (got, want) in enumerate(zip(decoded, xs, strict=True)):
        assert got.tobytes() == want.tobytes(), f"link {i} of {spec}"


@pytest.mark.parametrize("name", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (4, 0), (1,), (15,), (16,), (3, 7, 5), (1000,)])
def test_every_dtype_and_shape(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> None:
    spec = TensorSpec(name, shape)
    words = smooth_words(name, spec.size, rng)
    assert words.size == spec.size
    roundtrip(words, spec)
    roundtrip(near(words, spec, rng), spec, {"prev": words})
    assert codecs.encode(np.empty(0, word_dtype(name)), TensorSpec(name, (0,))).payload == b""


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_tiny_tensors_are_stored_raw_without_trying_the_codecs(
    name: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor of at most RAW_MAX_BYTES, or no larger than the planes header (a step counter, a 1-element norm),
    is stored raw without running the planes codec; anything larger still goes through it. Up to the header's size
    that is the payload the full path makes too."""
    last = bytes_codec(BytePlanesZstd.name)
    specs = [TensorSpec(name, (n,)) for n in (1, 2, 3, 4, 5, 8, 9, 10, 15, 16, 17, 31, 32, 33, 65, 100)]
    cases = [(spec, smooth_words(name, spec.size, rng)) for spec in specs]
    full = {spec.size: (finish(words, spec, [], last), near(words, spec, rng)) for spec, words in cases}
    calls: list[int] = []
    real = BytePlanesZstd.encode_parts

    def counting(self: BytePlanesZstd, words: np.ndarray, spec: TensorSpec, *a: Any, **kw: Any) -> Any:
        calls.append(spec.size)
        return real(self, words, spec, *a, **kw)

    monkeypatch.setattr(BytePlanesZstd, "encode_parts", counting)
    header = BytePlanesZstd.smallest_payload(specs[0])
    for spec, words in cases:
        key, prev = full[spec.size]
        calls.clear()
        enc = codecs.encode(words, spec, {"prev": prev})
        raw = spec.nbytes <= max(RAW_MAX_BYTES, header)
        assert (calls == []) == raw, f"{spec}: coded {calls} (header {header} B)"
        if raw:
            assert enc.codecs == [] and enc.payload == words.tobytes()
        if spec.nbytes <= header:
            assert key.codecs == [] and key.payload == enc.payload, "nothing is shorter than raw there"
        roundtrip(words, spec, {"prev": prev})
    assert any(s.nbytes > max(RAW_MAX_BYTES, header) for s in specs), "some cases must be coded"


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_all_special_patterns_with_delta(name: str, rng: np.random.Generator) -> None:
    """Every pair of special words as (prev, cur): the delta of NaN → inf, -0 → +0 ... is exact."""
    sp = np.array(special_words(name), dtype=word_dtype(name))
    cur = np.repeat(sp, len(sp))
    prev = np.tile(sp, len(sp))
    if name == "complex128" and cur.size % 2:  # two words per element
        cur, prev = cur[:-1], prev[:-1]
    spec = TensorSpec(name, (cur.size // 2,)) if name == "complex128" else TensorSpec(name, (cur.size,))
    roundtrip(cur, spec)
    roundtrip(cur, spec, {"prev": prev})
    roundtrip(prev, spec, {"prev": cur})


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("predictor", [("prev", None), ("scale", 0.999), ("scale", 3.0), ("scale", 1e-30)])
def test_delta_codec_direct(name: str, predictor: tuple[str, float | None], rng: np.random.Generator) -> None:
    """The delta codec itself, with each predictor, is exactly invertible on arbitrary bits."""
    pred, scale = predictor
    codec = OrderedDelta(pred, None if scale is None else float.hex(scale))
    spec = TensorSpec(name, (512,))
    wd = word_dtype(name)
    cur = np.frombuffer(rng.bytes(512 * wd.itemsize), dtype=wd).copy()
    cur[: len(special_words(name))] = special_words(name)
    prev = np.frombuffer(rng.bytes(512 * wd.itemsize), dtype=wd).copy()
    with np.errstate(all="ignore"):
        coded = codec.encode(cur, spec, {"prev": prev})
        back = codec.decode(coded.copy(), spec, {"prev": prev})
    assert back.tobytes() == cur.tobytes()
    again = from_record(codec.record())
    assert isinstance(again, OrderedDelta) and again.config() == codec.config()


def test_large_tensor_parallel_planes(rng: np.random.Generator) -> None:
    """Tensors past the parallel threshold code their planes on the thread pool; still exact."""
    n = (5 * 1024 * 1024) // 4
    words = smooth_words("float32", n, rng)
    spec = TensorSpec("float32", (n,))
    enc = roundtrip(words, spec)
    assert len(enc.payload) < words.nbytes
    roundtrip(near(words, spec, rng, 0.1), spec, {"prev": words})


def test_decode_returns_fresh_memory(rng: np.random.Generator) -> None:
    words = smooth_words("float32", 100, rng)
    spec = TensorSpec("float32", (100,))
    enc = codecs.encode(words, spec)
    a = codecs.decode(enc.payload, enc.codecs, spec)
    a[:] = 0
    b = codecs.decode(enc.payload, enc.codecs, spec)
    assert b.tobytes() == words.tobytes()


def _large_pair(rng: np.random.Generator, rows: int = 1031, cols: int = 1100) -> tuple[np.ndarray, np.ndarray]:
    """A float32 matrix past every size threshold (parallel planes, split decode) and its next version: rows move
    by their own scale, so the per-row predictor is chosen."""
    prev = (rng.standard_normal((rows, cols)) * 0.05).astype("<f4")
    row_scale = (1 - rng.random((rows, 1)) * 1e-2).astype("<f4")
    cur = (prev * row_scale + (rng.standard_normal((rows, cols)) * 1e-5).astype("<f4")).astype("<f4")
    return cur.reshape(-1).view("<u4").copy(), prev.reshape(-1).view("<u4").copy()


@pytest.mark.parametrize("predictor", ["prev", "scale", "rowscale"])
def test_reusable_reference_is_decoded_into(predictor: str, rng: np.random.Generator) -> None:
    """A reference the caller hands over becomes the output (a chain reuses one buffer); one it keeps is not
    touched. Large and with an odd row count, so the decode runs as two row-aligned halves."""
    cur, prev = _large_pair(rng)
    spec = TensorSpec("float32", (1031, 1100))
    codec = {
        "prev": OrderedDelta("prev"),
        "scale": OrderedDelta("scale", float.hex(float(np.float32(0.995)))),
        "rowscale": OrderedDelta("rowscale", rows=1031, scales=(1 - rng.random(1031) * 1e-2).astype("<f4")),
    }[predictor]
    enc = finish(cur, spec, [codec], bytes_codec("planes-zstd", 1), prev)
    assert enc.roles == ("prev",)
    kept = prev.copy()
    fresh = codecs.decode(enc.payload, enc.codecs, spec, {"prev": kept})
    assert fresh.tobytes() == cur.tobytes() and fresh is not kept and kept.tobytes() == prev.tobytes()
    handed = prev.copy()
    out = codecs.decode(enc.payload, enc.codecs, spec, {"prev": handed}, reusable={"prev"})
    assert out is handed and out.tobytes() == cur.tobytes()
    readonly = prev.copy()
    readonly.flags.writeable = False  # not usable as output: decoded into fresh memory instead
    out = codecs.decode(enc.payload, enc.codecs, spec, {"prev": readonly}, reusable={"prev"})
    assert out is not readonly and out.tobytes() == cur.tobytes()


def test_damaged_large_payload_raises_codec_error(rng: np.random.Generator) -> None:
    """A tensor past the parallel-plane and split-decode thresholds: cut or flipped zstd frames are a CodecError
    (or, for a flip zstd cannot see, an array of the right size that the store's hash then refuses)."""
    words, _ = _large_pair(rng)
    spec = TensorSpec("float32", (1031, 1100))
    enc = codecs.encode(words, spec)
    payload = enc.payload
    methods = plane_methods(payload)
    assert ZSTD_CHUNKS in [m for m, _ in methods]  # 1.1 M words: planes over 1 MiB are chunked
    for cut in (len(payload) // 3, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            codecs.decode(payload[:cut], enc.codecs, spec)
    start = 1 + 9 * len(methods)
    for m, length in methods:  # damage the middle of each zstd frame, or of each chunked plane's frames
        if m in (ZSTD, ZSTD_CHUNKS):
            bad = bytearray(payload)
            bad[start + length // 2] ^= 0xFF
            try:
                out = codecs.decode(bytes(bad), enc.codecs, spec)
            except CodecError:
                pass
            else:
                assert out.size == spec.size
        start += length if m in (RAW, ZSTD, ZSTD_CHUNKS) else 0


# ---------------------------------------------------------------------------------------------- chunked planes
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=6000), k=st.sampled_from([1, 2, 4, 8]), chunk=st.integers(1, 700))
def test_chunked_planes_round_trip_and_record_version_2(data: bytes, k: int, chunk: int) -> None:
    """Planes longer than ``chunk`` become independent zstd frames (method 3); every payload decodes bit-exactly,
    and the record says version 2 exactly when a plane is chunked (version-1 readers keep reading the rest)."""
    n = len(data) // k
    words = np.frombuffer(data[: n * k], dtype=f"<u{k}").copy()
    spec = TensorSpec({1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}[k], (n,))
    codec = BytePlanesZstd()
    parts = codec.encode_parts(words, spec, chunk=chunk)
    payload = b"".join(bytes(p) for p in parts)
    assert codec.decode(payload, spec).tobytes() == words.tobytes()
    chunked = ZSTD_CHUNKS in [m for m, _ in plane_methods(payload)]
    assert codec.record_for(parts)["version"] == (2 if chunked else 1)
    assert codec.record_for([payload]) == codec.record_for(parts)
    if chunked:
        assert n > chunk


def _chunked(rng: np.random.Generator) -> tuple[np.ndarray, TensorSpec, bytes, int]:
    """Compressible uint32 words whose top plane is chunked (small random deltas: planes 1-3 compress)."""
    words = rng.integers(0, 1 << 12, 5000, dtype=np.uint32) | np.uint32(0x3F00_0000)
    spec = TensorSpec("uint32", (5000,))
    payload = BytePlanesZstd().encode_parts(words, spec, chunk=1000)
    data = b"".join(bytes(p) for p in payload)
    methods = plane_methods(data)
    plane = next(i for i, (m, _) in enumerate(methods) if m == ZSTD_CHUNKS)
    start = 1 + 9 * len(methods) + sum(v for m, v in methods[:plane] if m in (RAW, ZSTD, ZSTD_CHUNKS))
    return words, spec, data, start


def test_damaged_chunk_tables_raise_codec_error(rng: np.random.Generator) -> None:
    words, spec, data, start = _chunked(rng)
    assert BytePlanesZstd().decode(data, spec).tobytes() == words.tobytes()
    chunk, count = struct.unpack_from("<QI", data, start)
    assert (chunk, count) == (1000, 5)

    def patched(offset: int, fmt: str, value: int) -> bytes:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, offset, value)
        return bytes(bad)

    cases = {
        "zero chunk size": patched(start, "<Q", 0),
        "chunk size that does not cover the plane": patched(start, "<Q", 999),
        "wrong chunk count": patched(start + 8, "<I", 6),
        "a frame length that overruns": patched(start + 12, "<Q", 10**6),
        "a frame length that falls short": patched(start + 12, "<Q", 1),
    }
    for what, bad in cases.items():
        with pytest.raises(CodecError):
            BytePlanesZstd().decode(bad, spec)
            pytest.fail(f"{what}: decoded")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_damaged_chunked_payloads_are_codec_errors(data: st.DataObject) -> None:
    """Any byte of a chunked payload changed, or the payload cut anywhere: a CodecError or an array of the right
    size (which the store's hash then refuses), never another exception, on both decode paths."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _, spec, payload, _ = _chunked(rng)
    bad = bytearray(payload)
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            bad[data.draw(st.integers(0, len(bad) - 1))] = data.draw(st.integers(0, 255))
    else:
        del bad[data.draw(st.integers(0, len(bad) - 1)) :]
    codec = BytePlanesZstd()
    try:
        out = codec.decode(bytes(bad), spec)
    except CodecError:
        pass
    else:
        assert out.size == spec.size
    got: list[np.ndarray] = []
    with contextlib.suppress(CodecError):
        codec.decode_chunks(bytes(bad), spec, lambda planes, lo, hi: got.append(planes[0][: hi - lo].copy()))


@pytest.mark.parametrize("predictor", ["fit", "prev", "scale", "rowscale"])
def test_payload_bytes_do_not_depend_on_the_thread_count(rng: np.random.Generator, predictor: str) -> None:
    """The chunk size is fixed, not derived from the cores, and the fused loops and row sums split on exact
    boundaries: 1, 2 and 3 coding threads write the same bytes, and decode them the same."""
    cur, prev = _large_pair(rng)
    spec = TensorSpec("float32", (1031, 1100))
    before = planes_mod.coding_threads()
    try:
        payloads = []
        for threads in (1, 2, 3):
            planes_mod.set_coding_threads(threads)
            if predictor == "fit":
                enc = codecs.encode(cur, spec, {"prev": prev})
            else:
                codec = delta_codec(predictor, cur, prev, 1031)
                assert codec is not None
                enc = finish(cur, spec, [codec], bytes_codec("planes-zstd", 1), prev)
            payloads.append((enc.codecs, enc.payload))
            assert codecs.decode(enc.payload, enc.codecs, spec, {"prev": prev}).tobytes() == cur.tobytes()
        assert payloads[0] == payloads[1] == payloads[2]
        assert payloads[0][0][-1]["version"] == 2
    finally:
        planes_mod.set_coding_threads(before)


def delta_row_scales(cur: np.ndarray, prev: np.ndarray, rows: int) -> np.ndarray:
    from ckptstore.codecs.delta import _row_scales

    return _row_scales(cur.view(np.float32), prev.view(np.float32), rows)


def delta_codec(predictor: str | None, cur: np.ndarray, prev: np.ndarray, rows: int) -> OrderedDelta | None:
    """The delta codec of each predictor for a float32 pair of ``rows`` rows (None: a keyframe)."""
    if predictor is None:
        return None
    if predictor == "rowscale":
        return OrderedDelta("rowscale", rows=rows, scales=delta_row_scales(cur, prev, rows))
    return OrderedDelta("scale", float.hex(float(np.float32(0.995)))) if predictor == "scale" else OrderedDelta("prev")


@pytest.mark.parametrize("predictor", [None, "prev", "scale", "rowscale"])
def test_chunked_payloads_decode_chunk_by_chunk(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, predictor: str | None
) -> None:
    """A chunked payload decodes chunk by chunk (never through whole planes), bit-exactly, for a keyframe and for
    each delta predictor, with chunks that cut rows in the middle (rowscale then codes partial rows with one
    scale); an output buffer handed over is written in place."""
    rows, cols = 37, 300  # 11,100 words; 1,000-byte chunks end mid-row
    cur, prev = _words_pair(rng, rows * cols)
    spec = TensorSpec("float32", (rows, cols))
    monkeypatch.setattr(planes_mod, "CHUNK_BYTES", 1000)
    codec = delta_codec(predictor, cur, prev, rows)
    enc = finish(cur, spec, [codec] if codec else [], bytes_codec("planes-zstd", 1), prev)
    assert ZSTD_CHUNKS in [m for m, _ in plane_methods(enc.payload[(8 + 4 * rows) if predictor == "rowscale" else 0 :])]
    whole_planes = BytePlanesZstd.decode_planes
    monkeypatch.setattr(BytePlanesZstd, "decode_planes", lambda *a: pytest.fail("decoded through whole planes"))
    handed = prev.copy()
    out = codecs.decode(enc.payload, enc.codecs, spec, {"prev": handed}, reusable={"prev"})
    assert out.tobytes() == cur.tobytes()
    assert (out is handed) == (codec is not None)
    monkeypatch.setattr(BytePlanesZstd, "decode_planes", whole_planes)
    planes = BytePlanesZstd().decode_planes(enc.payload[(8 + 4 * rows) if predictor == "rowscale" else 0 :], spec)
    whole = codec.decode_planes(planes, spec, {"prev": prev}) if codec else BytePlanesZstd.join(planes, spec)
    assert whole is not None and whole.tobytes() == cur.tobytes()  # the plane-by-plane path reads it the same


@pytest.mark.parametrize("predictor", [None, "prev", "scale", "rowscale"])
@pytest.mark.parametrize("content", ["smooth", "random-off-sample"])
def test_chunk_by_chunk_encode_writes_the_plane_by_plane_payload(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, predictor: str | None, content: str
) -> None:
    """The chunk-by-chunk encoder (residual planes made and compressed one chunk at a time) writes exactly the
    bytes of the plane-by-plane one, including a plane that the sampled check sends to zstd but that does not
    compress (random everywhere except at the sampled elements: stored raw after all)."""
    rows, cols = 300, 300  # 90,000 words: past the sampled randomness check; 7,000-byte chunks end mid-row
    cur, prev = _words_pair(rng, rows * cols)
    noise = np.zeros(1, np.uint32)
    if content == "random-off-sample":
        noise = rng.integers(0, 1 << 32, cur.size, dtype=np.uint64).astype(np.uint32)
        noise[planes_mod.random_sample(cur.size)] = 0
        prev = prev ^ (noise & np.uint32(0xFF))  # low residual byte random except at the sample
    spec = TensorSpec("float32", (rows, cols))
    monkeypatch.setattr(planes_mod, "CHUNK_BYTES", 7000)
    codec = delta_codec(predictor, cur, prev, rows)
    last = BytePlanesZstd()
    if codec is None:  # a keyframe: the planes of the words themselves
        cur = cur ^ (noise & np.uint32(0xFF)) if content == "random-off-sample" else cur
    fused = span_encoder(cur, spec, [codec] if codec else [], {"prev": prev})
    assert fused is not None
    chunked = last.encode_chunks(cur.size, fused[0], fused[1], parallel=True)
    assert chunked is not None
    planes = codec.encode_planes(cur, spec, {"prev": prev}) if codec else None
    reference = last.encode_parts(cur, spec, planes)
    assert b"".join(bytes(p) for p in chunked) == b"".join(bytes(p) for p in reference)
    methods = [m for m, _ in plane_methods(bytes(chunked[0]))]
    assert ZSTD_CHUNKS in methods
    if content == "random-off-sample":
        assert methods[0] == RAW  # sent to zstd by the sample, raw after all
    enc = finish(cur, spec, [codec] if codec else [], last, prev)
    assert codecs.decode(enc.payload, enc.codecs, spec, {"prev": prev}).tobytes() == cur.tobytes()


def _words_pair(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    prev = rng.standard_normal(n).astype(np.float32)
    cur = (prev * np.float32(0.995) + rng.standard_normal(n).astype(np.float32) * np.float32(1e-4)).astype(np.float32)
    return cur.view(np.uint32), prev.view(np.uint32)


def test_spans_cover_the_range_once() -> None:
    before = planes_mod.coding_threads()
    try:
        planes_mod.set_coding_threads(3)
        assert planes_mod.spans(10, False) == [(0, 10)]
        assert planes_mod.spans(10, True) == [(0, 3), (3, 6), (6, 10)]
        assert planes_mod.spans(2, True) == [(0, 1), (1, 2)]  # fewer elements than threads: no empty span
        assert planes_mod.spans(1, True) == [(0, 1)]
        with pytest.raises(ValueError):
            planes_mod.set_coding_threads(0)
    finally:
        planes_mod.set_coding_threads(before)


# ---------------------------------------------------------------------------------------------- units
WIDTHS = [np.uint8, np.uint16, np.uint32, np.uint64]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), wd=st.sampled_from(WIDTHS))
def test_to_ordered_is_an_involution(data: st.DataObject, wd: type) -> None:
    bits = np.dtype(wd).itemsize * 8
    vals = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50))
    w = np.array(vals, dtype=wd)
    o = to_ordered(w)
    assert o.dtype == w.dtype
    assert to_ordered(o).tobytes() == w.tobytes()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), width=st.sampled_from([16, 32, 64]))
def test_to_ordered_preserves_order_of_finite_floats(data: st.DataObject, width: int) -> None:
    fl = st.floats(width=width, allow_nan=False, allow_infinity=True)
    a, b = data.draw(fl), data.draw(fl)
    ft, ut, it = np.dtype(f"<f{width // 8}"), np.dtype(f"<u{width // 8}"), np.dtype(f"<i{width // 8}")
    x = np.array([a, b], dtype=ft)
    o = to_ordered(x.view(ut)).view(it)
    if x[0] < x[1]:
        assert o[0] < o[1]
    elif x[0] > x[1]:
        assert o[0] > o[1]
    elif x.view(ut)[0] == x.view(ut)[1]:
        assert o[0] == o[1]
    else:  # -0.0 and +0.0: equal as floats, adjacent as ordered ints
        assert abs(int(o[0]) - int(o[1])) == 1


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_to_ordered_exhaustive_small_floats(name: str) -> None:
    """All bit patterns of the 8/16-bit formats: ordered ints sort exactly like the float values."""
    torch = pytest.importorskip("torch")
    wd = word_dtype(name)
    words = np.arange(2 ** (8 * wd.itemsize), dtype=np.uint64).astype(wd)
    tdt = getattr(torch, name)
    signed = torch.int16 if wd.itemsize == 2 else torch.uint8
    vals = torch.from_numpy(words.view(np.int16) if wd.itemsize == 2 else words).view(signed).view(tdt)
    values = vals.to(torch.float64).numpy()
    finite = np.isfinite(values) | np.isinf(values)
    finite &= ~np.isnan(values)
    ordered = to_ordered(words).view(f"<i{wd.itemsize}").astype(np.int64)[finite]
    v = values[finite]
    order = np.lexsort((ordered, v))
    assert np.all(np.diff(ordered[order]) > 0), "ordered ints must increase with the value"


@settings(max_examples=100, deadline=None)
@given(data=st.data(), wd=st.sampled_from(WIDTHS))
def test_zigzag_inverse(data: st.DataObject, wd: type) -> None:
    bits = np.dtype(wd).itemsize * 8
    vals = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50))
    w = np.array(vals, dtype=wd)
    assert unzigzag(zigzag(w.copy())).tobytes() == w.tobytes()
    assert zigzag(unzigzag(w.copy())).tobytes() == w.tobytes()


@pytest.mark.parametrize("wd", WIDTHS)
def test_zigzag_maps_small_signed_to_small_unsigned(wd: type) -> None:
    it = np.dtype(wd).str.replace("u", "i")
    d = np.array([0, -1, 1, -2, 2, -3, 3], dtype=it).view(wd)
    assert zigzag(d).tolist() == [0, 1, 2, 3, 4, 5, 6]
    extremes = np.array([np.iinfo(it).max, np.iinfo(it).min], dtype=it).view(wd)
    assert zigzag(extremes).tolist() == [np.iinfo(wd).max - 1, np.iinfo(wd).max]


def plane_methods(payload: bytes) -> list[tuple[int, int]]:
    k = payload[0]
    return [struct.unpack_from("<BQ", payload, 1 + 9 * i) for i in range(k)]


def test_planes_constant_tensor_is_all_const() -> None:
    words = np.full(1000, 0x3F80_1234, dtype=np.uint32)
    spec = TensorSpec("float32", (1000,))
    payload = BytePlanesZstd().encode(words, spec)
    assert plane_methods(payload) == [(CONST, 0x34), (CONST, 0x12), (CONST, 0x80), (CONST, 0x3F)]
    assert len(payload) == 1 + 4 * 9
    assert BytePlanesZstd().decode(payload, spec).tobytes() == words.tobytes()


def test_planes_random_bytes_are_raw(rng: np.random.Generator) -> None:
    words = np.frombuffer(rng.bytes(4 * 4096), dtype=np.uint32).copy()
    spec = TensorSpec("float32", (4096,))
    payload = BytePlanesZstd().encode(words, spec)
    assert [m for m, _ in plane_methods(payload)] == [RAW] * 4
    assert [v for _, v in plane_methods(payload)] == [4096] * 4
    assert BytePlanesZstd().decode(payload, spec).tobytes() == words.tobytes()


def test_planes_mixed_selection(rng: np.random.Generator) -> None:
    """Random low byte, repetitive middle byte, constant high bytes → RAW, ZSTD, CONST, CONST."""
    n = 8192
    low = rng.integers(0, 256, n, dtype=np.uint32)
    mid = (np.arange(n, dtype=np.uint32) // 512 % 4) << 8
    words = (low | mid | (0x7F << 16)).astype(np.uint32)
    spec = TensorSpec("uint32", (n,))
    payload = BytePlanesZstd().encode(words, spec)
    assert [m for m, _ in plane_methods(payload)] == [RAW, ZSTD, CONST, CONST]
    assert plane_methods(payload)[2][1] == 0x7F and plane_methods(payload)[3][1] == 0
    assert BytePlanesZstd().decode(payload, spec).tobytes() == words.tobytes()


def test_planes_one_byte_words_have_one_plane(rng: np.random.Generator) -> None:
    words = rng.integers(0, 3, 5000).astype(np.uint8)
    spec = TensorSpec("int8", (5000,))
    payload = BytePlanesZstd().encode(words, spec)
    assert payload[0] == 1 and plane_methods(payload)[0][0] == ZSTD
    assert BytePlanesZstd().decode(payload, spec).tobytes() == words.tobytes()


def test_incompressible_tensor_is_stored_raw(rng: np.random.Generator) -> None:
    words = np.frombuffer(rng.bytes(8 * 1000), dtype=np.uint64).copy()
    enc = codecs.encode(words, TensorSpec("float64", (1000,)))
    assert enc.codecs == [] and enc.payload == words.tobytes()


def test_estimate_bits() -> None:
    assert estimate_bits(np.zeros(100, np.uint32)) == 0.0
    assert estimate_bits(np.zeros(0, np.uint32)) == 0.0
    assert estimate_bits(np.arange(256, dtype=np.uint8)) == pytest.approx(8.0)


# ---------------------------------------------------------------------------------------------- damage
def _samples() -> list[tuple[str, bytes, list[dict[str, Any]], TensorSpec, dict[str, np.ndarray] | None]]:
    rng = np.random.default_rng(1234)
    n = 600
    spec = TensorSpec("float32", (n,))
    words = smooth_words("float32", n, rng)
    words[:8] = 0x3F800000  # some constant runs
    mixed = (
        rng.integers(0, 256, n, dtype=np.uint32) | (np.arange(n, dtype=np.uint32) // 50 % 3) << 8 | (0x41 << 24)
    ).astype(np.uint32)
    prev = near(words, spec, rng, 0.2)
    key = codecs.encode(words, spec)
    mix = codecs.encode(mixed, spec)
    delta = codecs.encode(words, spec, {"prev": prev})
    raw = codecs.encode(np.frombuffer(rng.bytes(4 * n), np.uint32).copy(), spec)
    assert key.codecs and not delta.is_keyframe and not raw.codecs
    return [
        ("keyframe", key.payload, key.codecs, spec, None),
        ("mixed", mix.payload, mix.codecs, spec, None),
        ("delta", delta.payload, delta.codecs, spec, {"prev": prev}),
        ("raw", raw.payload, raw.codecs, spec, None),
    ]


SAMPLES = _samples()


@pytest.mark.parametrize("sample", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_truncated_payload_raises_codec_error(sample: Any) -> None:
    _, payload, chain, spec, refs = sample
    cuts = sorted(set(range(0, min(len(payload), 80))) | set(range(0, len(payload), 7)) | {len(payload) - 1})
    for cut in cuts:
        with pytest.raises(CodecError):
            codecs.decode(payload[:cut], chain, spec, refs)


@pytest.mark.parametrize("sample", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_corrupted_payload_raises_codec_error_or_decodes_to_the_right_shape(sample: Any) -> None:
    """Flipping any byte may go undetected by the codec (the store's hash catches it), but decoding must never
    fail with anything other than CodecError, nor return an array of the wrong size."""
    _, payload, chain, spec, refs = sample
    for pos in range(len(payload)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(payload)
            bad[pos] ^= flip
            try:
                out = codecs.decode(bytes(bad), chain, spec, refs)
            except CodecError:
                continue
            assert out.size == spec.size and out.dtype == np.dtype("<u4"), (pos, flip)


@pytest.mark.parametrize("value", [256, 4096, 2**63])
def test_const_plane_with_out_of_range_byte_is_a_codec_error(value: int) -> None:
    spec = TensorSpec("uint8", (10,))
    payload = bytes([1]) + struct.pack("<BQ", CONST, value)
    with pytest.raises(CodecError):
        codecs.decode(payload, [BytePlanesZstd().record()], spec)


def test_zstd_plane_declaring_a_huge_size_is_a_codec_error(rng: np.random.Generator) -> None:
    """A damaged zstd frame header can claim any content size; decoding must refuse it, not allocate it."""
    words = rng.integers(0, 4, 600).astype(np.uint8)
    spec = TensorSpec("uint8", (600,))
    payload = bytearray(BytePlanesZstd().encode(words, spec))
    assert plane_methods(bytes(payload))[0][0] == ZSTD
    frame = 1 + 9
    assert payload[frame : frame + 4] == b"\x28\xb5\x2f\xfd"  # zstd magic
    payload[frame + 4] |= 0xC0  # frame header descriptor: 8-byte content size field → an enormous size
    with pytest.raises(CodecError):
        codecs.decode(bytes(payload), [BytePlanesZstd().record()], spec)


@pytest.mark.parametrize(
    "header",
    [
        b"",
        bytes([0]),
        bytes([3]),
        bytes([4]) + b"\x00" * 5,
        bytes([4]) + struct.pack("<BQ", 7, 0) * 4,
        bytes([4]) + struct.pack("<BQ", RAW, 2**62) * 4,
        bytes([4]) + struct.pack("<BQ", ZSTD, 10) * 4 + b"x" * 40,
    ],
)
def test_malformed_plane_headers(header: bytes) -> None:
    with pytest.raises(CodecError):
        codecs.decode(header, [BytePlanesZstd().record()], TensorSpec("float32", (10,)))


def test_wrong_element_count_is_a_codec_error(rng: np.random.Generator) -> None:
    words = smooth_words("float32", 100, rng)
    enc = codecs.encode(words, TensorSpec("float32", (100,)))
    with pytest.raises(CodecError):
        codecs.decode(enc.payload, enc.codecs, TensorSpec("float32", (101,)))
    with pytest.raises(CodecError):
        codecs.decode(enc.payload, enc.codecs, TensorSpec("float32", (99,)))
    with pytest.raises(CodecError):
        codecs.decode(words.tobytes(), [], TensorSpec("float32", (99,)))


# ---------------------------------------------------------------------------------------------- records
PLANES = {"name": "planes-zstd", "version": 1, "config": {"level": 3}}


@pytest.mark.parametrize(
    "chain",
    [
        [{"name": "no-such-codec", "version": 1, "config": {}}],
        [{"name": "planes-zstd", "version": 99, "config": {}}],
        [{"name": "delta", "version": 2, "config": {"predictor": "prev"}}, PLANES],
        [{"version": 1}],
        ["planes-zstd"],
        [{"name": "planes-zstd", "version": "x"}],
        [{"name": "planes-zstd", "version": 1, "config": {"bogus": 1}}],
        [{"name": "planes-zstd", "version": 1, "config": {"level": "high"}}],
        [{"name": "planes-zstd", "version": 1, "config": [1, 2]}],
        [{"name": "delta", "version": 1, "config": {"predictor": "magic"}}, PLANES],
        [{"name": "delta", "version": 1, "config": {"predictor": "scale"}}, PLANES],
        [{"name": "delta", "version": 1, "config": {"predictor": "scale", "scale": "not-a-hex-float"}}, PLANES],
        [{"name": "delta", "version": 1, "config": {"predictor": "scale", "scale": 5}}, PLANES],
        [{"name": "delta", "version": 1, "config": {"predictor": "prev"}}],  # no bytes codec at the end
        [PLANES, {"name": "delta", "version": 1, "config": {"predictor": "prev"}}],  # wrong order
        [PLANES, PLANES],
    ],
)
def test_bad_codec_records_raise_codec_error(chain: list[Any], rng: np.random.Generator) -> None:
    spec = TensorSpec("float32", (64,))
    words = smooth_words("float32", 64, rng)
    payload = BytePlanesZstd().encode(words, spec)
    with pytest.raises(CodecError):
        codecs.decode(payload, chain, spec, {"prev": words})


def test_unknown_codec_and_newer_version_say_upgrade() -> None:
    with pytest.raises(CodecError) as ei:
        from_record({"name": "zipnn-v9", "version": 1, "config": {}})
    assert ei.value.hint and "upgrade" in ei.value.hint
    with pytest.raises(CodecError) as ei:
        from_record({"name": "delta", "version": OrderedDelta.version + 1, "config": {}})
    assert "upgrade" in str(ei.value)


def test_delta_needs_a_matching_reference(rng: np.random.Generator) -> None:
    spec = TensorSpec("float32", (64,))
    words = smooth_words("float32", 64, rng)
    enc = codecs.encode(words, spec, {"prev": words.copy()})
    assert enc.roles == ("prev",)
    with pytest.raises(CodecError):
        codecs.decode(enc.payload, enc.codecs, spec)
    with pytest.raises(CodecError):
        codecs.decode(enc.payload, enc.codecs, spec, {"prev": words[:-1]})
    with pytest.raises(CodecError):
        codecs.decode(enc.payload, enc.codecs, spec, {"prev": words.view(np.uint16)[:64]})


def test_reference_of_another_shape_is_ignored_by_encode(rng: np.random.Generator) -> None:
    spec = TensorSpec("float32", (64,))
    words = smooth_words("float32", 64, rng)
    enc = codecs.encode(words, spec, {"prev": np.zeros(65, np.uint32)})
    assert enc.is_keyframe
    enc = codecs.encode(words, spec, {"prev": np.zeros(64, np.uint64)})
    assert enc.is_keyframe


def test_records_round_trip_and_registry() -> None:
    reg = registered()
    assert {"delta", "planes-zstd"} <= set(reg)
    for codec in (BytePlanesZstd(7), OrderedDelta("prev"), OrderedDelta("scale", float.hex(0.999))):
        again = from_record(codec.record())
        assert type(again) is type(codec) and again.record() == codec.record()


def test_register_twice_refused() -> None:
    class Impostor(ArrayCodec):
        name = "delta"

        def encode(self, words: np.ndarray, spec: TensorSpec, refs: Any) -> np.ndarray:
            return words

        def decode(self, words: np.ndarray, spec: TensorSpec, refs: Any) -> np.ndarray:
            return words

    with pytest.raises(CodecError):
        register(Impostor)
    assert registered()["delta"] is OrderedDelta


def test_custom_array_codec_in_a_chain(rng: np.random.Generator) -> None:
    class NegateForTest(ArrayCodec):
        name = "test-negate"

        def encode(self, words: np.ndarray, spec: TensorSpec, refs: Any) -> np.ndarray:
            return np.negative(words)

        def decode(self, words: np.ndarray, spec: TensorSpec, refs: Any) -> np.ndarray:
            return np.negative(words)

    if "test-negate" not in registered():
        register(NegateForTest)
    codec = from_record({"name": "test-negate", "version": 1, "config": {}})
    spec = TensorSpec("int32", (100,))
    words = rng.integers(0, 2**32, 100, dtype=np.uint64).astype(np.uint32)
    payload = BytePlanesZstd().encode(codec.encode(words, spec, {}), spec)  # type: ignore[attr-defined]
    back = codecs.decode(payload, [codec.record(), BytePlanesZstd().record()], spec)
    assert back.tobytes() == words.tobytes()


def test_tensor_spec_sizes() -> None:
    assert TensorSpec("complex128", (3,)).size == 6
    assert TensorSpec("complex128", (3,)).nbytes == 48
    assert TensorSpec("bfloat16", (2, 3)).nbytes == 12
    assert TensorSpec("float32", ()).size == 1
    assert TensorSpec("float32", (0, 5)).size == 0
    assert math.prod(()) == 1


def test_coding_threads_default_to_the_cores_and_follow_the_environment() -> None:
    import os
    import subprocess
    import sys

    code = "from ckptstore.codecs import planes; print(planes.coding_threads())"
    env = {k: v for k, v in os.environ.items() if k != "CKPTSTORE_CODING_THREADS"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(default.stdout) == len(os.sched_getaffinity(0))
    env["CKPTSTORE_CODING_THREADS"] = "3"
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(chosen.stdout) == 3
