"""A DCP checkpoint saved by 4 ranks is a normal checkpoint for everything that reads full tensors:
``Store.load_leaves`` resolves the full names of its ``dcp`` section, so ``ckpt export`` (safetensors and the
open_clip_train ``.pt``), ``ckpt analyze`` and ``ckpt thin`` work on it, bit-exactly against the original state."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _worker import CLIP_SHAPES, clip_state
from test_dcp import bits, ranks

from ckptstore.errors import FormatError, TensorNotFoundError
from ckptstore.policy import thin
from ckptstore.store import create_store, open_store


def ckpt(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptstore.cli", *argv], capture_output=True, text=True, timeout=300)


def same_state(got: Any, want: Any, where: str = "") -> None:
    """Equal nested states: tensors by dtype, shape and raw bytes; everything else by value and type."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert bits(got) == bits(want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, list(got), list(want))
        for k in want:
            same_state(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same_state(g, w, f"{where}/{i}")
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("dcp") / "store")
    create_store(url)
    ranks(url, "4:clip_save:1:a", "4:clip_save:2:b", "4:clip_save:3:a")  # step 2 sharded by columns
    return url


def test_load_leaves_resolves_full_names(clip_store: str) -> None:
    store = open_store(clip_store)
    m = store.manifest("clip", 2)
    assert "state_dict/visual.proj" not in m.tensors  # stored as shards only
    assert len(m.full_tensors["state_dict/visual.proj"]["chunks"]) == 4
    leaves = store.load_leaves(m, ["state_dict/visual.proj", "state_dict/logit_scale", "state_dict/visual.proj/@0,2"])
    want = clip_state(2)["state_dict"]
    assert leaves["state_dict/visual.proj"].data.tobytes() == bits(want["visual.proj"])
    assert leaves["state_dict/visual.proj"].shape == (16, 8)
    assert leaves["state_dict/logit_scale"].shape == ()  # replicated: one chunk, which is the full tensor
    assert leaves["state_dict/visual.proj/@0,2"].shape == (16, 2)  # a shard by its own name still reads
    # a replicated tensor's full-tensor object is its shard's content hash; a sharded one's a hash of its chunks
    assert m.full_tensors["state_dict/logit_scale"]["object"].startswith("xxh128:")
    assert m.full_tensors["state_dict/visual.proj"]["object"].startswith("dcp:")
    assert (
        store.manifest("clip", 1).full_tensors["state_dict/visual.proj"]["object"]
        != m.full_tensors["state_dict/visual.proj"]["object"]
    )
    with pytest.raises(TensorNotFoundError):
        store.load_leaves(m, ["state_dict/nothing"])
    # the whole state: the original nesting and key types (optimizer state keyed by int, lists as lists)
    same_state(store.load("clip@2", tensors="torch"), clip_state(2))
    walked = [(m.step, state) for m, state in store.iter_load("clip", tensors="torch")]
    assert [s for s, _ in walked] == [1, 2, 3]
    for s, state in walked:
        same_state(state, clip_state(s))


def test_damaged_layout_is_a_format_error(clip_store: str) -> None:
    store = open_store(clip_store)
    m = store.manifest("clip", 1)
    item = next(it for it in m.data["dcp"]["items"].values() if it["name"] == "state_dict/visual.proj")
    saved = item["chunks"][1]["offsets"]
    try:
        item["chunks"][1]["offsets"] = [99, 0]  # a shard placed outside the tensor
        m._full = None
        with pytest.raises(FormatError, match="outside"):
            store.load_leaves(m, ["state_dict/visual.proj"])
    finally:
        item["chunks"][1]["offsets"] = saved
        m._full = None


def test_export_safetensors_and_pt(clip_store: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    r = ckpt("export", "-s", clip_store, "clip@2", "--format", "safetensors", "-O", str(out), "--json")
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    want = clip_state(2)["state_dict"]
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and bits(got[k]) == bits(v), k

    pt = tmp_path / "epoch_3.pt"
    r = ckpt("export", "-s", clip_store, "clip@3", "-O", str(pt))
    assert r.returncode == 0, r.stderr
    same_state(torch.load(pt, weights_only=True), clip_state(3))
    # and torch.optim takes the exported optimizer state back (int keys, lists)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in CLIP_SHAPES.values()]
    opt = torch.optim.AdamW(params)
    opt.load_state_dict(torch.load(pt, weights_only=True)["optimizer"])
    assert bits(opt.state[params[2]]["exp_avg"]) == bits(clip_state(3)["optimizer"]["state"][2]["exp_avg"])


def test_a_trajectory_indexes_the_shards_of_its_weights(clip_store: str) -> None:
    """StoreTrajectory keeps, per checkpoint, the weights' shard tensors, their chain objects and their part of the
    ``dcp`` section only; its walks and state dicts are the original full tensors bit for bit."""
    from ckptstore.analysis.trajectory import StoreTrajectory

    store = open_store(clip_store)
    traj = StoreTrajectory(store, "clip")
    assert [p.step for p in traj.points] == [1, 2, 3]
    kept, whole = traj._index[1], store.manifest("clip", 2)
    weights = {f"state_dict/{k}" for k in CLIP_SHAPES}
    assert set(kept.full_tensors) == weights
    assert {it["name"] for it in kept.data["dcp"]["items"].values()} == weights
    shards = {c["tensor"] for n in weights for c in whole.full_tensors[n]["chunks"]}
    assert set(kept.tensors) == shards and len(shards) < len(whole.tensors)
    assert set(kept.objects) == {o for t in shards for o in whole.chain(whole.tensors[t]["object"])}
    assert all(kept.full_tensors[n] == whole.full_tensors[n] for n in weights)
    for k in CLIP_SHAPES:
        for i, x in enumerate(traj.iter_tensor(k)):
            want = clip_state(i + 1)["state_dict"][k]
            if want.dtype == torch.bfloat16:  # walks widen bfloat16 to float32 exactly
                want = want.float()
            assert x.tobytes() == bits(want), (k, i)
    same_state(traj.state_dict(1), clip_state(2)["state_dict"])


def test_analyze_and_thin(clip_store: str, tmp_path: Path) -> None:
    r = ckpt("analyze", "weights", "-s", clip_store, "clip", "--json", "--no-pca")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    text = json.dumps(rep)
    assert "visual.proj" in text and "token_embedding.weight" in text
    r = ckpt("analyze", "optimizer", "-s", clip_store, "clip", "--json")
    assert r.returncode == 0, r.stderr

    # thin's weight path reads the full weights of every checkpoint: the distance is the original tensors'
    recs = thin.compute_paths(open_store(clip_store), "clip")
    a, b = clip_state(1)["state_dict"], clip_state(2)["state_dict"]
    want = math.sqrt(sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in a))
    assert recs[2]["weights"] == "state_dict/" and recs[2]["distance"] == pytest.approx(want, rel=1e-6)
    assert recs[2]["distance"] > 0
    r = ckpt("thin", "-s", clip_store, "clip", "--keep", "select:1", "--json")  # needs the weight paths
    assert r.returncode == 0, r.stderr
    store = open_store(clip_store)
    left = store.steps("clip")
    assert 3 in left and len(left) < 3  # the latest always stays; something went
    assert store.verify()["ok"]
    for s in left:
        same_state(store.load(f"clip@{s}", tensors="torch"), clip_state(s))
