"""Store settings recorded in ckptstore.json (keyframe interval, zstd level, bytes codec), and a codec registered
from outside the package ending every chain of a store."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from ckptstore import create_store, open_store
from ckptstore.cli.main import main as ckpt
from ckptstore.codecs import BytesCodec, TensorSpec, register
from ckptstore.errors import CodecError, FormatError


class XorBytes(BytesCodec):
    """A toy bytes codec: every byte XOR a key, then zlib (it must be smaller than raw, or the writer stores raw)."""

    name = "test-xor"

    def __init__(self, key: int = 0x5A) -> None:
        self.key = int(key)

    def config(self) -> dict[str, int]:
        return {"key": self.key}

    def encode(self, words: np.ndarray, spec: TensorSpec) -> bytes:
        return zlib.compress((np.ascontiguousarray(words).view(np.uint8) ^ np.uint8(self.key)).tobytes())

    def decode(self, payload: memoryview | bytes, spec: TensorSpec) -> np.ndarray:
        raw = np.frombuffer(zlib.decompress(payload), np.uint8) ^ np.uint8(self.key)
        return raw.view(f"<u{spec.dt.itemsize}")


register(XorBytes)


def test_settings_are_recorded_and_used_by_later_writers(tmp_path: Path) -> None:
    create_store(tmp_path / "s", keyframe_interval=2, level=5)
    info = json.loads((tmp_path / "s" / "ckptstore.json").read_text())
    assert info["settings"] == {"keyframe_interval": 2, "zstd_level": 5, "codec": "planes-zstd", "layout": "dense"}
    store = open_store(tmp_path / "s")  # a later process with no options of its own
    assert (store.keyframe_interval, store.level, store.codec) == (2, 5, "planes-zstd")
    assert open_store(tmp_path / "s", keyframe_interval=3).keyframe_interval == 3  # an explicit override wins
    rng = np.random.default_rng(0)
    w = rng.standard_normal(20_000).astype(np.float32)
    for step in range(1, 5):
        w = (w + np.float32(1e-3) * rng.standard_normal(w.size).astype(np.float32)).astype(np.float32)
        store.save("r", step, {"w": w})
    manifests = [store.manifest("r", s) for s in range(1, 5)]
    depths = [m.objects[m.tensors["w"]["object"]]["depth"] for m in manifests]
    assert max(depths) < 2  # chains bounded by the recorded interval, not the default 4
    level = {c["config"]["level"] for m in manifests for o in m.objects.values() for c in o["codecs"]
             if c["name"] == "planes-zstd"}  # fmt: skip
    assert level == {5}


def test_init_flags_and_show_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = str(tmp_path / "s")
    assert ckpt(["init", "--store", s, "--keyframe-interval", "8", "--level", "3"]) == 0
    capsys.readouterr()
    assert ckpt(["show-store", "--store", s, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"] == {"keyframe_interval": 8, "zstd_level": 3, "codec": "planes-zstd", "layout": "dense"}
    assert out["settings_recorded"] and out["version"] == 1
    assert ckpt(["show-store", "--store", s]) == 0
    assert "keyframe_interval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ckpt(["init", "--store", str(tmp_path / "t"), "--level", "99"])
    assert not (tmp_path / "t").exists()


def test_a_store_without_settings_reads_with_the_defaults(tmp_path: Path) -> None:
    create_store(tmp_path / "s")
    path = tmp_path / "s" / "ckptstore.json"
    info = json.loads(path.read_text())
    del info["settings"]  # as every store written before settings were recorded
    path.write_text(json.dumps(info))
    store = open_store(tmp_path / "s")
    assert store.settings == {"keyframe_interval": 4, "zstd_level": 1, "codec": "planes-zstd", "layout": "dense"}


def test_a_codec_registered_outside_the_package_round_trips_a_store(tmp_path: Path) -> None:
    store = create_store(tmp_path / "s", codec="test-xor")
    rng = np.random.default_rng(1)
    states = [{"w": rng.integers(0, 4, (64, 64)).astype(np.float32), "b": np.arange(32, dtype=np.int64) * s}
              for s in range(1, 4)]  # fmt: skip
    for step, st in enumerate(states, 1):
        store.save("r", step, st)
    again = open_store(tmp_path / "s")
    for step, st in enumerate(states, 1):
        got = again.load(f"r@{step}", tensors="numpy")
        assert all(got[k].tobytes() == v.tobytes() for k, v in st.items())
        chains = [[c["name"] for c in o["codecs"]] for o in again.manifest("r", step).objects.values() if o["codecs"]]
        assert chains and all(ch[-1] == "test-xor" for ch in chains)
    assert again.verify()["ok"]


def test_an_unknown_codec_is_refused_before_the_store_exists(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="no bytes codec named 'nope'"):
        create_store(tmp_path / "s", codec="nope")
    assert not (tmp_path / "s" / "ckptstore.json").exists()


@pytest.mark.parametrize(
    "change",
    [
        {"settings": [4, 1]},
        {"settings": {"keyframe_interval": "four"}},
        {"settings": {"zstd_level": float("nan")}},
        {"settings": {"keyframe_interval": 1e400}},
        {"settings": {"zstd_level": True}},
        {"version": "1"},
        {"version": None},
    ],
)
def test_a_forged_store_file_is_a_format_error(tmp_path: Path, change: dict) -> None:
    """Found by fuzzing (benchmarks/fuzz_inputs.py): these raised AttributeError, ValueError, TypeError or
    OverflowError from the settings and version of ckptstore.json."""
    create_store(tmp_path / "s")
    path = tmp_path / "s" / "ckptstore.json"
    info = json.loads(path.read_text())
    info.update(change)
    path.write_text(json.dumps(info))
    with pytest.raises(FormatError, match=r"ckptstore\.json"):
        open_store(tmp_path / "s")


def test_a_store_file_nested_thousands_deep_is_a_format_error(tmp_path: Path) -> None:
    create_store(tmp_path / "s")
    (tmp_path / "s" / "ckptstore.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json
    with pytest.raises(FormatError, match="not JSON"):
        open_store(tmp_path / "s")
