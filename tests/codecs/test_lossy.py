"""``lossy-q`` (the archive tier's codec): the per-element bound holds for every float dtype, shape, NaN/Inf
(kept bit-exact) and chain length; a reader decoding from the stored record reproduces the encoder's
reconstruction bit for bit; along a 50-checkpoint closed-loop chain the error never grows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckptstore.codecs import TensorSpec, from_record, registered
from ckptstore.codecs.lossy import Bound, LossyQuant, from_float, quantise, to_float
from ckptstore.errors import CodecError

DTYPES = ["float16", "bfloat16", "float32", "float64"]
NP = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": np.float32}


def _words(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[values.dtype.itemsize])


def _decode(codec: LossyQuant, words: np.ndarray, dtype: str, ref: np.ndarray | None) -> np.ndarray:
    """What a reader does: the codec from its JSON record and side bytes, the previous reconstruction's words."""
    reader = from_record(codec.record())
    assert isinstance(reader, LossyQuant)
    reader.load_side(codec.side_bytes())
    refs = {} if ref is None else {"prev": _words(from_float(ref, dtype), dtype)}
    out = reader.decode(words, TensorSpec(dtype, (words.size,)), refs)
    return to_float(out if dtype == "bfloat16" else out.view(NP[dtype]), dtype)


def _check(x: np.ndarray, recon: np.ndarray, decoded: np.ndarray, bound: Bound, rec: dict[str, Any]) -> None:
    assert np.array_equal(decoded, recon, equal_nan=True)
    fin = np.isfinite(x)
    assert np.array_equal(np.isnan(decoded), np.isnan(x))  # NaN stays NaN
    assert np.array_equal(decoded[np.isinf(x)], x[np.isinf(x)])  # ±Inf exactly
    err = np.abs(decoded[fin] - x[fin])
    if bound.mode == "elem":
        assert np.all(err <= bound.value * np.abs(x[fin]))
    else:
        assert np.all(err <= rec["eps"])
    if bound.mode == "elem":
        assert rec["max_err"] <= bound.value  # the recorded max error is within the recorded bound
    elif err.size:
        assert rec["max_err"] == float(err.max())  # the recorded max error is the one a reader sees


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    data=hnp.arrays(
        np.float64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40), elements=finite_or_not
    ),
    bound=st.one_of(
        st.builds(Bound, st.just("rel"), st.floats(1e-6, 0.5)),
        st.builds(Bound, st.just("abs"), st.floats(1e-6, 10.0)),
    ),
    with_ref=st.booleans(),
)
def test_linear_bound_for_every_dtype_shape_and_non_finite_value(
    dtype: str, data: np.ndarray, bound: Bound, with_ref: bool
) -> None:
    values = from_float(data.reshape(-1), dtype)
    x = to_float(values, dtype)
    ref = to_float(from_float(np.roll(np.nan_to_num(x, posinf=1.0, neginf=-1.0), 1) * 0.9, dtype), dtype)
    ref = ref if with_ref else None
    codec, words, recon, rec = quantise(values, dtype, bound, ref=ref)
    _check(x, recon, _decode(codec, words, dtype, ref), bound, rec)


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    data=hnp.arrays(np.float64, st.integers(0, 300), elements=st.floats(0, 1e30) | st.just(0.0)),
    rel=st.floats(1e-3, 0.5),
    special=st.lists(st.sampled_from([np.nan, np.inf, -1.0]), max_size=3),
)
def test_log_domain_bound_is_relative_per_element(
    dtype: str, data: np.ndarray, rel: float, special: list[float]
) -> None:
    x0 = np.concatenate([data, np.array(special, np.float64)])
    values = from_float(x0, dtype)
    x = to_float(values, dtype)
    bound = Bound("elem", rel)
    ref = x[::-1].copy() if x.size else None
    codec, words, recon, rec = quantise(values, dtype, bound, domain="log", ref=ref)
    _check(x, recon, _decode(codec, words, dtype, ref), bound, rec)
    assert np.array_equal(recon[x == 0], x[x == 0])  # zeros (never-updated second moments) exactly


@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), domain=st.sampled_from(["linear", "log"]))
def test_no_drift_along_a_50_checkpoint_chain(dtype: str, seed: int, domain: str) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(512)
    bound = Bound("abs", 1e-2) if domain == "linear" else Bound("elem", 0.02)
    ref: np.ndarray | None = None
    worst = []
    for _ in range(50):
        truth = truth + 3e-3 * rng.standard_normal(512)  # updates below the bound: open loop would drift
        x_in = np.exp(truth) if domain == "log" else truth
        values = from_float(x_in, dtype)
        x = to_float(values, dtype)
        codec, words, recon, _rec = quantise(values, dtype, bound, domain=domain, ref=ref)
        decoded = _decode(codec, words, dtype, ref)  # the reader decodes from its own previous result
        assert np.array_equal(decoded, recon)
        err = np.abs(decoded - x) / (np.abs(x) if domain == "log" else 1.0)
        worst.append(float(err.max()))
        ref = decoded
    assert max(worst) <= bound.value  # the last checkpoint is as good as the first: nothing accumulates


def test_the_codec_is_registered_and_refuses_bad_input() -> None:
    assert registered()["lossy-q"] is LossyQuant
    with pytest.raises(CodecError):
        Bound("rel", 0.0)
    with pytest.raises(CodecError):
        quantise(np.zeros(3, np.int32), "int32", Bound("rel", 1e-3))
    with pytest.raises(CodecError):
        quantise(np.zeros(3, np.float32), "float32", Bound("elem", 1e-3))  # elem bounds are for the log domain
    with pytest.raises(CodecError, match="damaged"):
        codec, words, _, _ = quantise(np.array([np.nan, 1.0], np.float32), "float32", Bound("rel", 1e-3))
        reader = from_record(codec.record())
        reader.load_side(codec.side_bytes()[:-3])  # a cut exception table
        reader.decode(words, TensorSpec("float32", (2,)), {})
