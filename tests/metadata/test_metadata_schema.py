"""The metadata schema (docs/metadata.md): every field and unknown extras round-trip through the store; malformed
metadata is refused with an error naming the field, before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore import metadata as md
from ckptstore.errors import InvalidMetadataError, InvalidStateError

FULL: dict[str, Any] = {
    "schema": 1,
    "step": 1200,
    "epoch": 5,
    "samples_seen": 153_600,
    "tokens_seen": 10**15,
    "wall_time": 3723.5,
    "lr": [3e-4, 1.5e-4],
    "loss": {"last": 0.71, "avg": 0.74, "window": 100},
    "grad_norm": 1.25,
    "loss_scale": 65536.0,
    "metrics": {"val_loss": 0.3121, "zeroshot_top1": 0.5612, "val/acc": 0.9, "image_to_text_R@1": 0.1, "skipped": None},
    "eval_samples": 512,
    "counters": {"optimizer_steps": 1198, "scheduler_steps": 1200},
    "hparams": {"lr": 3e-4, "batch_size": 64, "model": "ViT-B-32", "aug": {"scale": [0.9, 1.0]}, "resume": None},
    "command": ["train.py", "--lr", "3e-4", "--name", "ünïcødé run"],
    "code": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True, "branch": "main", "repo": "/src/x"},
    "versions": {"python": "3.11.9", "torch": "2.14.1", "open_clip": "3.3.0", "cuda": None},
    "hardware": {"devices": ["NVIDIA H100 80GB HBM3"] * 2, "device_count": 2, "world_size": 16, "rank": 3,
                 "accelerator": "cuda", "cpu": "AMD EPYC 9654", "cpu_count": 192, "platform": "Linux-6.1"},
    "save_reason": "interval: every 1000 steps",
    "tags": ["release", "best-val", "v1.0+rc:2"],
    "notes": "first run with the new tokenizer\nlooks good ✓",
    "model": "ViT-B-32",
    "source": {"kind": "open_clip_train", "file": "/x/epoch_5.pt"},
    # unknown extras are preserved as they are
    "my_extra": {"nested": [1, 2.5, "three", None, True, {"deep": []}], "": 0},
    "ema_decay": 0.9999,
    "big_int": 2**70,
}  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> ckptstore.Store:
    return ckptstore.create_store(tmp_path / "s")


def test_every_field_round_trips_through_the_store(store: ckptstore.Store) -> None:
    store.save("r", 1200, {"w": np.ones(3, np.float32)}, FULL)
    got = ckptstore.open_store(store.url).resolve("r@1200").metadata
    assert got == FULL
    assert list(got) == list(FULL)
    assert md.decode(got) == FULL
    assert md.validate(got) == FULL  # stored metadata validates again (metadata edits re-check it)


@pytest.mark.parametrize("field", list(FULL))
def test_each_field_alone_round_trips(store: ckptstore.Store, field: str) -> None:
    store.save("r", 1, {"w": np.ones(1)}, {field: FULL[field]})
    assert ckptstore.open_store(store.url).resolve("r@1").metadata == {field: FULL[field]}


@pytest.mark.parametrize("field", [f for f in FULL if f not in ("schema", "tags")])
def test_known_fields_may_be_null(store: ckptstore.Store, field: str) -> None:
    store.save("r", 1, {"w": np.ones(1)}, {field: None})
    assert ckptstore.open_store(store.url).resolve("r@1").metadata == {field: None}


def test_non_finite_allowed_where_documented(store: ckptstore.Store) -> None:
    meta = {"loss": {"last": math.nan, "avg": math.inf, "window": 3}, "grad_norm": math.inf}
    store.save("r", 1, {"w": np.ones(1)}, meta)
    raw = ckptstore.open_store(store.url).resolve("r@1").metadata
    assert raw == {"loss": {"last": {"$float": "nan"}, "avg": {"$float": "inf"}, "window": 3},
                   "grad_norm": {"$float": "inf"}}  # fmt: skip
    back = md.decode(raw)
    assert math.isnan(back["loss"]["last"]) and back["loss"]["avg"] == math.inf and back["grad_norm"] == math.inf
    store.update_metadata("r@1", lambda m: m.update(notes="diverged"))  # tagged values validate again
    again = ckptstore.open_store(store.url).resolve("r@1").metadata
    assert again["loss"] == raw["loss"] and again["notes"] == "diverged"


def test_edit_keeps_every_other_field(store: ckptstore.Store) -> None:
    store.save("r", 7, {"w": np.ones(3, np.float32)}, FULL)
    md.set_notes(store, "r@7", "edited", append=True)
    md.add_tags(store, "r@7", ["new"])
    got = ckptstore.open_store(store.url).resolve("r@7").metadata
    assert got == {**FULL, "notes": FULL["notes"] + "\nedited", "tags": [*FULL["tags"], "new"]}


TOO_LONG_NOTES = "x" * (md.MAX_NOTES_BYTES + 1)
BAD: list[tuple[dict[str, Any], str]] = [
    ({"step": -1}, "step"),
    ({"step": 1.5}, "step"),
    ({"step": True}, "step"),
    ({"epoch": "5"}, "epoch"),
    ({"epoch": math.nan}, "epoch"),
    ({"epoch": -1}, "epoch"),
    ({"samples_seen": 2.0}, "samples_seen"),
    ({"tokens_seen": -5}, "tokens_seen"),
    ({"wall_time": math.inf}, "wall_time"),
    ({"wall_time": -1}, "wall_time"),
    ({"lr": [1e-3, math.nan]}, "lr.1"),
    ({"lr": []}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"loss": 0.5}, "loss"),
    ({"loss": math.nan}, "loss"),
    ({"loss": {"last": "x"}}, "loss.last"),
    ({"loss": {"window": 0}}, "loss.window"),
    ({"loss": {"last": 1.0, "spike": math.inf}}, "loss.spike"),
    ({"grad_norm": -0.5}, "grad_norm"),
    ({"grad_norm": "big"}, "grad_norm"),
    ({"loss_scale": math.inf}, "loss_scale"),
    ({"metrics": {"acc": math.nan}}, "metrics.acc"),
    ({"metrics": {"acc": -math.inf}}, "metrics.acc"),
    ({"metrics": {"acc": "0.5"}}, "metrics.acc"),
    ({"metrics": {"acc": True}}, "metrics.acc"),
    ({"metrics": {"val": {"loss": 1}}}, "metrics.val"),
    ({"metrics": {"acc": np.float32(0.5)}}, "metrics.acc"),
    ({"metrics": [1, 2]}, "metrics"),
    ({"metrics": {"": 1}}, "metrics."),
    ({"metrics": {"a\nb": 1}}, "metrics.a\nb"),
    ({"eval_samples": -1}, "eval_samples"),
    ({"counters": {"x": -1}}, "counters.x"),
    ({"counters": {"x": 1.5}}, "counters.x"),
    ({"hparams": {"lr": math.nan}}, "hparams.lr"),
    ({"hparams": {"opt": {"betas": [0.9, math.inf]}}}, "hparams.opt.betas.1"),
    ({"hparams": "lr=1"}, "hparams"),
    ({"command": ["a", 1]}, "command.1"),
    ({"command": 5}, "command"),
    ({"code": {"commit": "xyz"}}, "code.commit"),
    ({"code": {"commit": "ABCDEF12"}}, "code.commit"),
    ({"code": {"dirty": "yes"}}, "code.dirty"),
    ({"code": "abc123"}, "code"),
    ({"versions": {"torch": 2.1}}, "versions.torch"),
    ({"hardware": {"world_size": 0}}, "hardware.world_size"),
    ({"hardware": {"devices": "gpu"}}, "hardware.devices"),
    ({"hardware": {"device_count": -1}}, "hardware.device_count"),
    ({"save_reason": 3}, "save_reason"),
    ({"tags": "release"}, "tags"),
    ({"tags": ["a b"]}, "tags.0"),
    ({"tags": ["ok", "ok"]}, "tags.1"),
    ({"tags": ["x" * 129]}, "tags.0"),
    ({"tags": [""]}, "tags.0"),
    ({"tags": [1]}, "tags.0"),
    ({"tags": None}, "tags"),
    ({"notes": TOO_LONG_NOTES}, "notes"),
    ({"notes": 5}, "notes"),
    ({"model": ["x"]}, "model"),
    ({"schema": 2}, "schema"),
    ({"schema": 0}, "schema"),
    ({"schema": None}, "schema"),
    ({"extra": math.nan}, "extra"),
    ({"extra": {"a": [1, -math.inf]}}, "extra.a.1"),
    ({"extra": np.float32(1)}, "extra"),
    ({"extra": np.zeros(2)}, "extra"),
    ({"extra": object()}, "extra"),
    ({"extra": {1, 2}}, "extra"),
    ({"extra": b"x"}, "extra"),
    ({"extra": {1.5: "x"}}, "extra"),
]


@pytest.mark.parametrize(("meta", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_malformed_metadata_names_the_field(store: ckptstore.Store, snapshot: Any, meta: dict[str, Any],
                                            field: str) -> None:  # fmt: skip
    store.save("r", 1, {"w": np.ones(2)}, {"epoch": 1})
    before = snapshot(store.url)
    with pytest.raises(InvalidMetadataError) as ei:
        store.save("r", 2, {"w": np.ones(2)}, meta)
    exc = ei.value
    assert exc.field == field
    assert f"metadata field {field!r}" in str(exc)
    assert isinstance(exc, InvalidStateError) and isinstance(exc, ValueError) and isinstance(exc, TypeError)
    with pytest.raises(InvalidMetadataError) as ei:  # an edit after the fact is checked the same way
        store.update_metadata("r@1", lambda m: m.update(meta))
    assert ei.value.field == field
    assert snapshot(store.url) == before
    assert ckptstore.open_store(store.url).resolve("r@1").metadata == {"epoch": 1}


def test_notes_at_the_limit_are_fine_one_byte_more_is_not(store: ckptstore.Store) -> None:
    at_limit = "é" * (md.MAX_NOTES_BYTES // 2)  # two bytes each in UTF-8
    store.save("r", 1, {"w": np.ones(1)}, {"notes": at_limit})
    assert ckptstore.open_store(store.url).resolve("r@1").metadata["notes"] == at_limit
    with pytest.raises(InvalidMetadataError) as ei:
        md.set_notes(store, "r@1", "!", append=True)
    assert ei.value.field == "notes" and f"{md.MAX_NOTES_BYTES + 2} bytes" in str(ei.value)


def test_whole_metadata_size_limit(store: ckptstore.Store) -> None:
    with pytest.raises(InvalidMetadataError) as ei:
        store.save("r", 1, {"w": np.ones(1)}, {"epoch": 1, "hparams": {"blob": "x" * md.MAX_METADATA_BYTES}})
    assert ei.value.field == "hparams" and "'hparams'" in str(ei.value)


def test_not_a_dict() -> None:
    with pytest.raises(InvalidMetadataError):
        md.validate([("epoch", 1)])  # type: ignore[arg-type]
    assert md.validate(None) == {}


def test_tuples_and_int_keys_become_json(store: ckptstore.Store) -> None:
    store.save("r", 1, {"w": np.ones(1)}, {"lr": (0.1, 0.2), "extra": {1: (1, 2)}})
    assert ckptstore.open_store(store.url).resolve("r@1").metadata == {"lr": [0.1, 0.2], "extra": {"1": [1, 2]}}


def test_schema_is_documented() -> None:
    """docs/metadata.md documents every field the validator knows, and the limits it enforces."""
    doc = (Path(__file__).parents[2] / "docs" / "metadata.md").read_text()
    for field in FULL:
        if field not in ("my_extra", "ema_decay", "big_int"):
            assert f"`{field}`" in doc, field
    assert str(md.MAX_NOTES_BYTES) in doc and str(md.MAX_TAG_LENGTH) in doc


# ---------------------------------------------------------------------------------------------- property
finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | finite | st.text(max_size=8),
    lambda sub: st.lists(sub, max_size=3) | st.dictionaries(st.text(max_size=5), sub, max_size=3),
    max_leaves=8,
)
nonneg = st.integers(0, 2**63)
printable = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")  # what str.isprintable() refuses (and spaces)
names = st.text(st.characters(codec="utf-8", exclude_categories=printable), min_size=1, max_size=12)
tags = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1,
               max_size=10).filter(lambda t: t.strip() == t and not any(c.isspace() for c in t))  # fmt: skip
known = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.just(1),
        "step": nonneg,
        "epoch": nonneg | st.floats(0, 1e6),
        "samples_seen": nonneg,
        "wall_time": st.floats(0, 1e9),
        "lr": st.lists(st.floats(0, 10), min_size=1, max_size=4) | st.floats(0, 10),
        "loss": st.fixed_dictionaries(
            {}, optional={"last": any_float, "avg": any_float, "window": st.integers(1, 10**6)}
        ),
        "grad_norm": st.floats(0, 1e6) | st.sampled_from([math.inf, math.nan]),
        "metrics": st.dictionaries(names, finite | st.none(), max_size=4),
        "tags": st.lists(tags, max_size=4, unique=True),
        "notes": st.text(max_size=50),
        "hparams": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    },
)
extras = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in md._FIELDS), json_values, max_size=3)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(known, extras)
def test_valid_metadata_round_trips_through_json(meta: dict[str, Any], extra: dict[str, Any]) -> None:
    full = {**meta, **extra}
    stored = md.validate(full)
    text = json.dumps(stored, separators=(",", ":"), allow_nan=False)  # what the manifest holds
    back = json.loads(text)
    assert md.validate(back) == back  # idempotent on what is stored
    assert _same(md.decode(back), full)
