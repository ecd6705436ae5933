"""Hostile inputs, every kind the library reads: a fuzz target per untrusted input, a seeded structural mutator for
each, a sandboxed runner (an address-space limit and a per-case alarm in a child process) and a replayer for the
committed corpus (``tests/corpus/<target>/``).

A target takes bytes and hands them to the real public entry point: a manifest or a pack file of a real store
(then ``open_store``, ``load``, ``verify``), ``ckptstore.json``, a ref string (``parse_ref`` and
``Store.resolve``), a ``--where``/``--sort``/``--columns`` text (``query.select``), a foreign ``.pt`` file, a
safetensors file handed to ingest, a DCP folder's ``.metadata`` (``dcp_folder.ingest_folder``). Whatever comes
out that is not a :class:`~ckptstore.errors.CkptStoreError` is a *finding*, as is a case that runs past the alarm
(``timeout``), a ``MemoryError`` (an allocation from a forged length, under the address-space limit) and a child
that dies (``crash``). Cases are reproducible one by one: case ``i`` of target ``t`` under seed ``s`` is generated
from ``random.Random(f"{s}/{t}/{i}")``. ``benchmarks/fuzz_inputs.py`` runs them by the hundred thousand.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import multiprocessing
import os
import pickle
import pickletools
import random
import re
import resource
import shutil
import signal
import struct
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptstore.errors import CkptStoreError
from ckptstore.testing import fuzz

__all__ = ["TARGETS", "Target", "generate", "replay", "replay_corpus", "run_target"]

# ---------------------------------------------------------------------------------------------- generic mutators
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
               2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip
ODD_TEXT = ["\x00", "\n", "\r", "\t", " ", "\u202e", "\ufeff", "é", "\u0661", "\udcff", "\U0001f600", "'", '"',
            "\\", "/", "..", "%s", "{", "}", "[", "]", "(", ")", "@", "=", ":",
            "NaN", "inf", "-0", "1e999"]  # fmt: skip


def mutate_bytes(data: bytes, rng: random.Random, rounds: int = 0) -> bytes:
    """1-3 blind byte-level mutations: bit flips, odd bytes, odd integers written over, cuts, inserts, repeats."""
    buf = bytearray(data)
    for _ in range(rounds or rng.choice([1, 1, 2, 3])):
        n = len(buf)
        op = rng.randrange(8) if n else 6
        pos = rng.randrange(n) if n else 0
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:
            width = rng.choice([1, 2, 4, 8])
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, rng.choice(["little", "big"]))
        elif op == 3:
            del buf[pos:]
        elif op == 4:
            del buf[pos : pos + rng.randrange(1, 64)]
        elif op == 5:
            chunk = buf[pos : pos + rng.randrange(1, 64)]
            buf[pos:pos] = chunk * rng.choice([1, 2, 16])
        elif op == 6:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            buf += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return bytes(buf)


def mutate_text(text: str, rng: random.Random, tokens: list[str]) -> str:
    """1-3 mutations of a string: tokens of the target's language and odd characters inserted, spans cut or
    repeated (up to tens of thousands of times: recursion and length limits), characters replaced."""
    s = text
    for _ in range(rng.choice([1, 1, 2, 3])):
        pos = rng.randrange(len(s) + 1)
        op = rng.randrange(6)
        if op == 0:
            s = s[:pos] + rng.choice(tokens) + s[pos:]
        elif op == 1:
            s = s[:pos] + rng.choice(ODD_TEXT) + s[pos:]
        elif op == 2:
            s = s[:pos] + s[pos + rng.randrange(1, 8) :]
        elif op == 3:
            span = s[pos : pos + rng.randrange(1, 6)] or rng.choice(tokens)
            s = s[:pos] + span * rng.choice([2, 3, 100, 5000]) + s[pos:]
        elif op == 4 and s:
            i = rng.randrange(len(s))
            s = (
                s[:i]
                + chr(rng.choice([rng.randrange(32), rng.randrange(0x80, 0x800), rng.randrange(0x10000)]))
                + s[i + 1 :]
            )
        else:
            s = rng.choice(tokens) * rng.choice([1, 50, 20000]) + s
    return s


def text_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def bytes_text(data: bytes) -> str:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")


def mutate_json(doc: Any, rng: random.Random) -> bytes:
    """A structural mutation of a JSON document (:func:`ckptstore.testing.fuzz.mutate`), written with NaN and
    infinities allowed; sometimes the whole document nested thousands deep."""
    if rng.random() < 0.05:
        depth = rng.choice([100, 1000, 100_000])
        return (
            ("[" * depth + "]" * depth).encode()
            if rng.random() < 0.5
            else ('{"a":' * depth + "1" + "}" * depth).encode()
        )
    if isinstance(doc, dict) and doc:
        doc, _ = fuzz.mutate(doc, rng)
    if rng.random() < 0.1:
        doc = {**doc, rng.choice(list(doc) or ["x"]): rng.choice([float("nan"), float("inf"), -1e309, 10**400])}
    return json.dumps(doc, allow_nan=True).encode()


def strip_frames(raw: bytes) -> bytes:
    """A pickle without its FRAME opcodes (optional from protocol 4 on), so opcodes may change length."""
    out = bytearray()
    prev = 0
    for op, _arg, pos in pickletools.genops(raw):
        if op.name == "FRAME":
            out += raw[prev:pos]
            prev = (pos or 0) + 9
    out += raw[prev:]
    return bytes(out)


_GLOBALS = [("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"),
            ("torch", "load"), ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
            ("torch", "Size"), ("torch", "float32"), ("torch", "complex128"), ("torch", "quint8"),
            ("pathlib", "PosixPath"), ("numpy.core.multiarray", "_reconstruct"), ("builtins", "getattr"),
            ("torch.distributed.checkpoint.metadata", "Metadata")]  # fmt: skip


def mutate_pickle(raw: bytes, rng: random.Random) -> bytes:
    """An opcode-aware mutation of a pickle: an integer argument replaced by an odd one, a string or a global
    swapped (``os.system``, ``builtins.eval`` ...), an opcode dropped or repeated."""
    try:
        raw = strip_frames(raw)
        ops = list(pickletools.genops(raw))
    except Exception:
        return mutate_bytes(raw, rng)
    op, arg, pos = rng.choice(ops)
    nxt = next((p for _o, _a, p in ops if p is not None and p > (pos or 0)), len(raw))
    assert pos is not None
    kind = op.name
    if kind in ("BININT", "BININT1", "BININT2", "LONG1") and rng.random() < 0.8:
        value = rng.choice([*INTERESTING, -1, -(2**31), -(2**63), 2**70, rng.randrange(-100, 100)])
        new = b"\x8a" + _long1(value)  # LONG1 takes any integer
    elif kind in ("SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINSTRING", "BINSTRING", "UNICODE") and rng.random() < 0.8:
        s = rng.choice(["", "..", "../x", "/etc/passwd", "x" * 300, "__0_0.distcp", "model.w", "\udcff",
                        "data/0", "cpu", "cuda:0", "meta", str(arg) * 2])  # fmt: skip
        enc = s.encode("utf-8", "surrogatepass")
        new = b"X" + struct.pack("<I", len(enc)) + enc
    elif kind in ("GLOBAL", "STACK_GLOBAL") and rng.random() < 0.8:
        mod, name = rng.choice(_GLOBALS)
        new = b"c" + f"{mod}\n{name}\n".encode()
        if kind == "STACK_GLOBAL":  # the two strings before it stay on the stack: pop them
            new = b"00" + new
    elif rng.random() < 0.5:
        new = b""  # drop the opcode
    else:
        new = raw[pos:nxt] * 2
    return raw[:pos] + new + raw[nxt:]


def _long1(value: int) -> bytes:
    n = (value.bit_length() + 8) // 8 if value else 0
    return bytes([n]) + value.to_bytes(n, "little", signed=True)


# ---------------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One untrusted input: ``setup(folder)`` builds what a case needs (a store, a DCP folder) and returns a
    context; ``seeds(ctx)`` the valid inputs to mutate; ``mutate(ctx, seed, rng)`` one hostile input;
    ``run(ctx, data)`` hands it to the library's entry point. ``ext``: the corpus files' suffix."""

    name: str
    setup: Callable[[Path], dict[str, Any]]
    seeds: Callable[[dict[str, Any]], list[bytes]]
    mutate: Callable[[dict[str, Any], bytes, random.Random], bytes]
    run: Callable[[dict[str, Any], bytes], None]
    ext: str = ".bin"
    weight: float = 1.0  # share of ``--cases`` (about the inverse of a case's cost)
    what: str = ""


def _build_store(path: Path) -> Path:
    from ckptstore.testing import bitrot

    bitrot.build_store(path).close()
    return path


@contextlib.contextmanager
def _file_as(path: Path, data: bytes, original: bytes) -> Iterator[None]:
    path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(original)


def _open_load_verify(path: Path, ref: str) -> None:
    from ckptstore.store import open_store

    st = open_store(path)
    try:
        st.checkpoints()
        with contextlib.suppress(CkptStoreError):
            st.load(ref)
        st.verify()
    finally:
        st.close()


# -- manifests: the newest manifest of a store (its delta chain runs through every pack)
def _manifest_setup(folder: Path) -> dict[str, Any]:
    path = _build_store(folder / "store")
    file = sorted((path / "runs").rglob("*.json"))[-1]
    return {"store": path, "file": file, "original": file.read_bytes()}


def _manifest_mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
    from ckptstore.codecs.base import registered
    from ckptstore.format.manifest import manifest_bytes, parse_manifest

    doc = parse_manifest(seed, "seed")
    r = rng.random()
    if r < 0.25:  # codec ids and params: real codec records in the wrong places, odd configs
        objs = doc["objects"]
        rec = objs[rng.choice(list(objs))]
        names = sorted(registered())
        chain = [{"name": rng.choice(names), "version": rng.choice([1, 1, 2, 0, -1]), "config": {}}
                 for _ in range(rng.choice([1, 1, 2, 3]))]  # fmt: skip
        for c in chain:
            c["config"] = rng.choice([{}, {"level": rng.choice([0, 1, 23, -5, 2**40])}, {"side": True},
                                      {"predictor": rng.choice(["prev", "x", None])}, {"bits": 2**70}])  # fmt: skip
        rec["codecs"] = chain if rng.random() < 0.7 else [*rec["codecs"], *chain]
    elif r < 0.3:
        return mutate_bytes(seed, rng)
    else:
        doc, _ = fuzz.mutate(doc, rng)
    try:
        return manifest_bytes(doc)
    except (TypeError, ValueError):
        return seed


def _manifest_run(ctx: dict[str, Any], data: bytes) -> None:
    with _file_as(ctx["file"], data, ctx["original"]):
        _open_load_verify(ctx["store"], "rot@600")


# -- packs: the pack of the newest checkpoint, with forged headers, plane headers, side-data lengths, zstd frames
def _pack_setup(folder: Path) -> dict[str, Any]:
    from ckptstore.format.manifest import parse_manifest

    path = _build_store(folder / "store")
    mfile = sorted((path / "runs").rglob("*.json"))[-1]
    doc = parse_manifest(mfile.read_bytes(), str(mfile))
    pack = doc["objects"][doc["tensors"]["model/w1"]["object"]]["pack"]
    spans = [(o["offset"], o["length"], o["codecs"]) for o in doc["objects"].values() if o["pack"] == pack]
    file = path / pack
    return {"store": path, "file": file, "original": file.read_bytes(), "spans": spans}


def _pack_mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
    buf = bytearray(seed)
    off, length, codecs = rng.choice(ctx["spans"])
    r = rng.random()
    if r < 0.15:  # the 16-byte pack header: magic, version, reserved
        pos = rng.randrange(16)
        buf[pos : pos + 4] = rng.choice(INTERESTING).to_bytes(8, "little")[:4]
    elif r < 0.55 and length:  # a planes-zstd header: plane count, then (method u8, value u64) per plane
        start = off
        if codecs and codecs[0].get("config", {}).get("side"):
            if rng.random() < 0.5:
                buf[off : off + 8] = rng.choice(INTERESTING).to_bytes(8, "little")
                return bytes(buf)
            start += 8 + int.from_bytes(buf[off : off + 8], "little")
        k = buf[start] if start < len(buf) else 0
        which = rng.randrange(k + 1)
        if which == 0:
            buf[start] = rng.choice([0, 1, 2, 3, 8, 255])
        else:
            p = start + 1 + 9 * (which - 1)
            if rng.random() < 0.4:
                buf[p] = rng.choice([0, 1, 2, 3, 255])
            buf[p + 1 : p + 9] = rng.choice([*INTERESTING, rng.randrange(length + 16)]).to_bytes(8, "little")
    elif r < 0.75 and length:  # inside a zstd frame (its header declares the content size)
        i = bytes(buf).find(b"\x28\xb5\x2f\xfd", off, off + length)
        pos = (i if i >= 0 else off) + rng.randrange(4, 14)
        if pos < len(buf):
            buf[pos] = rng.randrange(256)
    elif r < 0.85:  # cut at an object boundary or inside one
        del buf[rng.choice([off, off + max(length // 2, 1), off + length, 16, 8]) :]
    else:
        return mutate_bytes(seed, rng)
    return bytes(buf)


def _pack_run(ctx: dict[str, Any], data: bytes) -> None:
    with _file_as(ctx["file"], data, ctx["original"]):
        _open_load_verify(ctx["store"], "rot@600")


# -- ckptstore.json: open the store, list, load, and save (writer settings come from it)
def _config_setup(folder: Path) -> dict[str, Any]:
    import numpy as np

    path = _build_store(folder / "store")
    file = path / "ckptstore.json"
    state = {"w": np.arange(64, dtype=np.float32), "step": 1}
    return {"store": path, "file": file, "original": file.read_bytes(), "state": state}


def _config_mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return mutate_bytes(seed, rng)
    doc = json.loads(seed)
    if rng.random() < 0.5:  # aim at the settings
        key = rng.choice(["keyframe_interval", "zstd_level", "codec", "layout", "x"])
        doc["settings"][key] = copy.deepcopy(rng.choice([*fuzz.ODD_VALUES, "hot", "raw", "delta", 0, 22, 23, 1e400]))
        return json.dumps(doc, allow_nan=True).encode()
    return mutate_json(doc, rng)


def _config_run(ctx: dict[str, Any], data: bytes) -> None:
    from ckptstore.store import open_store

    path: Path = ctx["store"]
    with _file_as(ctx["file"], data, ctx["original"]):
        try:
            st = open_store(path)
            try:
                st.checkpoints()
                st.load("rot@600")
                st.save("fz", 1, ctx["state"])
            finally:
                st.close()
        finally:
            for sub in ("runs/fz", "packs/fz"):
                shutil.rmtree(path / sub, ignore_errors=True)


# -- ref strings: parse_ref and Store.resolve on a real store
_REF_SEEDS = ["rot@600", "rot", "rot@latest", "rot@first", "rot@step=300", "rot@epoch=3", "rot@tag:best",
              "rot@best:loss.last", "rot@best:loss.last:max", "rot@best:metrics.val/loss:min", "rot@100"]  # fmt: skip
_REF_TOKENS = ["@", "=", ":", "step=", "epoch=", "latest", "first", "tag:", "best:", ":min", ":max", "rot", "9" * 30,
               "0", "-1", "..", "/", "loss.last", "epoch", "metadata.", "\u0661\u0662", "١", "x" * 300]  # fmt: skip


def _store_ctx(folder: Path) -> dict[str, Any]:
    from ckptstore.store import open_store

    path = _build_store(folder / "store")
    st = open_store(path)
    st.update_metadata("rot@600", lambda m: m.update(tags=["best"], metrics={"val/loss": 0.5}))
    return {"store": st}


def _ref_run(ctx: dict[str, Any], data: bytes) -> None:
    from ckptstore.refs import parse_ref

    text = bytes_text(data)
    with contextlib.suppress(CkptStoreError):
        parse_ref(text)
    ctx["store"].resolve(text)


# -- --where / --sort / --columns expressions
_WHERE_SEEDS = ["epoch >= 3", "loss.last < 0.3 and epoch > 1", "not (epoch == 2) or step in [100, 300]",
                "metrics['val/loss'] <= 0.5", 'tags contains "best"', "run == 'rot' and ratio > 1.5",
                "loss.last exists", "lr.0 != 1e-3", "metadata.epoch >= 2 and stored_bytes < 1000000",
                "-epoch", "step,epoch", "loss.*"]  # fmt: skip
_WHERE_TOKENS = ["and", "or", "not", "in", "==", "!=", "<", "<=", ">", ">=", "(", ")", "[", "]", ",", "'", '"',
                 "epoch", "step", "loss.last", "metrics.", "[0]", "['x']", "1e308", "1e999", "-", "NaN", "nan",
                 "inf", "True", "null", "contains", "exists", "matches", "*", ".", "0x10", "9" * 5000]  # fmt: skip


def _where_run(ctx: dict[str, Any], data: bytes) -> None:
    from ckptstore.query import select

    text = bytes_text(data)
    st = ctx["store"]
    with contextlib.suppress(CkptStoreError):
        select(st, where=text)
    with contextlib.suppress(CkptStoreError):
        select(st, sort=text)
    select(st, columns=text)


# -- foreign .pt files: ingest of an open_clip_train-like epoch_N.pt
def _small_pt_state() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {"visual.proj": torch.randn(8, 4, generator=g), "logit_scale": torch.tensor(2.6592),
          "token_embedding.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
          "positional": torch.arange(10, dtype=torch.int64)}  # fmt: skip
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(8, 4), "exp_avg_sq": torch.ones(8, 4)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2,
                             "params": [0]}]}  # fmt: skip
    return {"epoch": 1, "name": "fuzz", "state_dict": sd, "optimizer": opt}


def _torch_save(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _ingest_ctx(folder: Path) -> dict[str, Any]:
    # What ingest imports lazily is imported here, before the address-space limit: mapping libtorch under the
    # limit failed every case as an ImportError of the harness, not of the input.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import ckptstore.integrations.openclip
    import ckptstore.torch  # noqa: F401
    from ckptstore.store import create_store

    st = create_store(folder / "store")
    st.close()
    return {"store": folder / "store", "dir": folder / "in"}


def _pt_mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
    import torch

    r = rng.random()
    if r < 0.3:  # a forged object graph, saved for real
        state: Any = _small_pt_state()
        sd = state["state_dict"]
        pick = rng.randrange(10)
        if pick == 0:
            sd["visual.proj"] = torch.randn(8, 4).as_strided((8, 4), (rng.choice([0, 1, 4]), rng.choice([0, 1])))
        elif pick == 1:
            bad_key: Any = rng.choice([1, None, "", "a/../b", "x" * 300, "\x00", ("t",)])
            sd[bad_key] = torch.zeros(2)
        elif pick == 2:
            sd["x"] = rng.choice([torch.zeros(0, 5), torch.zeros(2, 2).to_sparse(),
                                  torch.zeros(3, dtype=torch.complex64),
                                  torch.zeros(2, dtype=torch.bool), torch.tensor([float("nan")]), torch.zeros(2)[1:],
                                  torch.zeros((1,) * 40), torch.empty(2, device="meta"),
                                  torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)])  # fmt: skip
        elif pick == 3:
            state[rng.choice(["epoch", "global_step", "samples_seen"])] = rng.choice(
                [-1, 2**63, 2**70, True, 1.5, "3", None, float("nan")]
            )
        elif pick == 4:
            state["state_dict"] = rng.choice([[1, 2], None, "sd", {"a": {"b": {"c": [torch.zeros(1)] * 3}}}])
        elif pick == 5:
            state["optimizer"] = rng.choice([None, [], {"state": 5}, {"param_groups": [{"lr": "x"}, 3]},
                                             {"param_groups": [{"lr": float("inf")}]},
                                             {"state": {"x": {"step": -1}}}])  # fmt: skip
        elif pick == 6:
            state = rng.choice([[state], (1, 2), "str", 5, None, {1: 2}])
        elif pick == 7:
            sd["shared"] = sd["visual.proj"][2:]
        elif pick == 8:
            state["name"] = rng.choice(["\udcff".encode("utf-8", "surrogatepass").decode("latin-1"), "x" * 10000, 5])
        else:
            sd["deep"] = [[[[[[[[[[torch.zeros(1)]]]]]]]]]]
        return _torch_save(state)
    if r < 0.7:  # a member of the zip (data.pkl, a storage, byteorder ...) forged, the zip rebuilt (CRCs right)
        try:
            zin = zipfile.ZipFile(io.BytesIO(seed))
            names = zin.namelist()
        except Exception:
            return mutate_bytes(seed, rng)
        victim = rng.choice([n for n in names if n.endswith("data.pkl")] * 3 + names)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
            for n in names:
                body = zin.read(n)
                if n == victim:
                    body = mutate_pickle(body, rng) if n.endswith(".pkl") else mutate_bytes(body, rng)
                if n != victim or rng.random() < 0.95:  # sometimes a member goes missing
                    zout.writestr(n, body)
        return out.getvalue()
    return mutate_bytes(seed, rng)


def _ingest_file(ctx: dict[str, Any], name: str, data: bytes) -> None:
    from ckptstore.integrations import openclip
    from ckptstore.store import open_store

    d: Path = ctx["dir"]
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_bytes(data)
    st = open_store(ctx["store"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            openclip.ingest(st, [f], run="fz")
    finally:
        st.close()
        f.unlink()
        for sub in ("runs/fz", "packs/fz"):
            shutil.rmtree(Path(ctx["store"]) / sub, ignore_errors=True)


def _pt_run(ctx: dict[str, Any], data: bytes) -> None:
    _ingest_file(ctx, "epoch_1.pt", data)


# -- safetensors files handed to ingest (the library writes safetensors but reads none: they must be refused)
def _safetensors_seed() -> bytes:
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]}}  # fmt: skip
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + bytes(range(30))


def _safetensors_mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack_from("<Q", seed)
    header, body = json.loads(seed[8 : 8 + n]), seed[8 + n :]
    r = rng.random()
    if r < 0.3:
        return struct.pack("<Q", rng.choice([*INTERESTING, n + 1, n - 1])) + seed[8:]
    if r < 0.8:
        h = mutate_json(header, rng)
        return struct.pack("<Q", len(h)) + h + body
    return mutate_bytes(seed, rng)


def _safetensors_run(ctx: dict[str, Any], data: bytes) -> None:
    _ingest_file(ctx, "model.safetensors", data)


# -- DCP folders: a forged .metadata (its pickle), ingested
def _dcp_setup(folder: Path) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    ctx = _ingest_ctx(folder)
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)},
             "step": 3, "extra": b"abc"}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder / "step_3")))
    ctx["folder"] = folder / "step_3"
    ctx["original"] = (folder / "step_3" / ".metadata").read_bytes()
    return ctx


_ODD_OBJ: list[Any] = [None, -1, 0, 2**31, 2**62, 2**70, -(2**63), "x", "..", "../x", "/etc/passwd", "", 1.5, [], {},
                       (), (-1,), (2**40, 2**40), b"\x00"]  # fmt: skip


def _dcp_mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    r = rng.random()
    if r < 0.5:  # a real Metadata with forged fields, pickled for real
        md = pickle.loads(ctx["original"])  # our own seed, written by dcp.save above
        key = rng.choice(list(md.storage_data))
        info = md.storage_data[key]
        pick = rng.randrange(8)
        if pick == 0:
            setattr(info, rng.choice(["offset", "length"]), rng.choice(_ODD_OBJ))
        elif pick == 1:
            info.relative_path = rng.choice(_ODD_OBJ)
        elif pick == 2:
            info.transform_descriptors = rng.choice([["stream.zstd/1"], ["nope/9"], "x", [5], ["stream.zstd/1"] * 3])
        elif pick == 3:
            item = md.state_dict_metadata[rng.choice([k for k, v in md.state_dict_metadata.items()
                                                      if isinstance(v, TensorStorageMetadata)])]  # fmt: skip
            c = item.chunks[0]
            sizes = rng.choice([torch.Size([2**40, 2**40]), torch.Size([-1, 4]), torch.Size([]), torch.Size([0, 4]),
                                torch.Size([12]), torch.Size([3, 4, 1])])  # fmt: skip
            if rng.random() < 0.5:
                item.chunks[0] = ChunkStorageMetadata(offsets=c.offsets, sizes=sizes)
            elif rng.random() < 0.5:
                item.chunks[0] = ChunkStorageMetadata(offsets=sizes, sizes=c.sizes)
            else:
                item.size = sizes
        elif pick == 4:
            item = rng.choice(list(md.state_dict_metadata.values()))
            if isinstance(item, TensorStorageMetadata):
                forged: Any = rng.choice([torch.complex64, torch.bool, torch.quint8, torch.float8_e4m3fn,
                                          torch.int64, torch.uint16, None, "float32"])  # fmt: skip
                item.properties.dtype = forged
        elif pick == 5:
            md.state_dict_metadata[rng.choice(["", "a/../b", "model.w.x", 5, "\x00"])] = rng.choice(
                list(md.state_dict_metadata.values())
            )
        elif pick == 6:
            md.planner_data = rng.choice([None, {"model.w": ("model",) * 40}, {"model.w": 5}, {"step": ()},
                                          {"model.w": ("a", 1, None)}, []])  # fmt: skip
        else:
            md.storage_data = {k: v for k, v in md.storage_data.items() if k is not key}
        return pickle.dumps(md, protocol=rng.choice([2, 4]))
    if r < 0.85:
        return mutate_pickle(seed, rng)
    return mutate_bytes(seed, rng)


def _dcp_run(ctx: dict[str, Any], data: bytes) -> None:
    from ckptstore.dcp_folder import ingest_folder
    from ckptstore.store import open_store

    file = ctx["folder"] / ".metadata"
    with _file_as(file, data, ctx["original"]):
        st = open_store(ctx["store"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ingest_folder(st, ctx["folder"], "fz", 3)
        finally:
            st.close()
            for sub in ("runs/fz", "packs/fz"):
                shutil.rmtree(Path(ctx["store"]) / sub, ignore_errors=True)


def _text_mutate(tokens: list[str]) -> Callable[[dict[str, Any], bytes, random.Random], bytes]:
    def mutate(ctx: dict[str, Any], seed: bytes, rng: random.Random) -> bytes:
        return text_bytes(mutate_text(bytes_text(seed), rng, tokens))

    return mutate


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("manifest", _manifest_setup, lambda c: [c["original"]], _manifest_mutate, _manifest_run, ".json", 0.3,
               "the newest manifest of a 5-checkpoint store, re-checksummed; open, list, load, verify"),
        Target("pack", _pack_setup, lambda c: [c["original"]], _pack_mutate, _pack_run, ".pack", 0.5,
               "the newest pack (headers, plane headers, side-data lengths, zstd frames); open, load, verify"),
        Target("config", _config_setup, lambda c: [c["original"]], _config_mutate, _config_run, ".json", 1.0,
               "ckptstore.json; open, list, load, save"),
        Target("ref", _store_ctx, lambda c: [text_bytes(s) for s in _REF_SEEDS], _text_mutate(_REF_TOKENS), _ref_run,
               ".txt", 6.0, "a checkpoint reference; parse_ref and Store.resolve"),
        Target("where", _store_ctx, lambda c: [text_bytes(s) for s in _WHERE_SEEDS], _text_mutate(_WHERE_TOKENS),
               _where_run, ".txt", 5.0, "a --where, --sort and --columns text; query.select"),
        Target("pt", _ingest_ctx, lambda c: [_torch_save(_small_pt_state())], _pt_mutate, _pt_run, ".pt", 1.5,
               "a foreign epoch_N.pt (zip, pickle, tensors); openclip.ingest"),
        Target("safetensors", _ingest_ctx, lambda c: [_safetensors_seed()], _safetensors_mutate, _safetensors_run,
               ".safetensors", 1.5, "a safetensors file handed to ingest; refused"),
        Target("dcp", _dcp_setup, lambda c: [c["original"]], _dcp_mutate, _dcp_run, ".metadata", 1.0,
               "a DCP folder's .metadata (pickle); dcp_folder.ingest_folder"),
    ]
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ running
class _CaseTimeout(BaseException):
    """Raised by the per-case alarm. A BaseException on purpose (not an error of the library): the code under test
    may catch ``Exception`` to wrap foreign errors, and must not swallow the alarm."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _CaseTimeout


def generate(target: Target, ctx: dict[str, Any], seeds: list[bytes], seed: int, i: int) -> bytes:
    """Case ``i`` of ``target`` under ``seed``: the same bytes every time."""
    rng = random.Random(f"{seed}/{target.name}/{i}")
    data = rng.choice(seeds)
    for round_ in range(rng.choice([1, 1, 1, 2])):
        try:
            data = target.mutate(ctx, data, rng)
        except Exception:  # a structural mutator handed what an earlier round broke: mutate blindly
            if not round_:
                raise
            data = mutate_bytes(data, rng)
    return data


def _where(exc: BaseException) -> str:
    """The innermost frame of the library (not its testing helpers) the exception passed through."""
    last = "?"
    for fr in traceback.extract_tb(exc.__traceback__):
        m = re.search(r"ckptstore/(.+\.py)$", fr.filename.replace(os.sep, "/"))
        if m and not m.group(1).startswith("testing/"):
            last = f"{m.group(1)}:{fr.name}"
    return last


def replay(target: Target, ctx: dict[str, Any], data: bytes, *, slow: float = 10.0) -> tuple[str, str]:
    """Run one input: ``("accepted" | "refused" | "finding", detail)``; detail is the error (type: message) or, for
    a finding, its kind (exception type and where in the library it came from) and, after `` | ``, its message."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, slow)
    try:
        target.run(ctx, data)
        return "accepted", ""
    except CkptStoreError as exc:
        return "refused", f"{type(exc).__name__}: {exc}"
    except _CaseTimeout:
        return "finding", f"timeout > {slow:g} s"
    except MemoryError as exc:
        return "finding", f"MemoryError at {_where(exc)} | {exc}"
    except Exception as exc:  # the point of fuzzing: anything else is a finding (RecursionError included)
        return "finding", f"{type(exc).__name__} at {_where(exc)} | {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _minimize(target: Target, ctx: dict[str, Any], data: bytes, kind: str, budget: int = 200) -> bytes:
    """A smaller input with the same finding kind: cut halves, then chunks, while the kind reproduces."""
    best = data
    tries = 0
    chunk = max(len(best) // 2, 1)
    while chunk >= 1 and tries < budget:
        i, shrunk = 0, False
        while i < len(best) and tries < budget:
            cand = best[:i] + best[i + chunk :]
            tries += 1
            outcome, detail = replay(target, ctx, cand, slow=2.0)
            if cand and outcome == "finding" and detail.split(" | ")[0] == kind:
                best, shrunk = cand, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return best


@dataclass
class _Result:
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    setup_s: float = 0.0
    peak_rss_mib: float = 0.0
    base_rss_mib: float = 0.0
    done: int = 0  # cases run (the index reached)

    def add_finding(self, kind: str, i: int, example: str) -> bool:
        new = kind not in self.findings
        f = self.findings.setdefault(kind, {"count": 0, "first_case": i, "example": example[:300]})
        f["count"] += 1
        return new


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        m = re.search(r"VmSize:\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024 if m else 0


def _child(name: str, start: int, stop: int, seed: int, slow: float, headroom: int, save: str | None,
           progress: Any, conn: Any) -> None:  # fmt: skip
    res = _Result()
    target = TARGETS[name]
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as d:
        t0 = time.perf_counter()
        ctx = target.setup(Path(d))
        seeds = target.seeds(ctx)
        res.setup_s = time.perf_counter() - t0
        res.base_rss_mib = _rss_mib()
        limit = _vm_size() + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        t0 = time.perf_counter()
        for i in range(start, stop):
            progress.value = i
            data = generate(target, ctx, seeds, seed, i)
            outcome, detail = replay(target, ctx, data, slow=slow)
            res.cases += 1
            if outcome == "accepted":
                res.accepted += 1
            elif outcome == "refused":
                res.refused += 1
            else:
                kind, _, message = detail.partition(" | ")
                if res.add_finding(kind, i, f"case {i}: {message}") and save:
                    small = _minimize(target, ctx, data, kind)
                    slug = re.sub(r"[^A-Za-z0-9]+", "-", kind).strip("-")[:80]
                    out = Path(save) / name
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"found-{slug}{target.ext}").write_bytes(small)
        res.seconds = time.perf_counter() - t0
        res.peak_rss_mib = _rss_mib()
        res.done = stop
    conn.send(res)


def run_target(name: str, cases: int, *, seed: int = 0, slow: float = 10.0, headroom: int = 2 << 30,
               save: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """``cases`` generated inputs of target ``name``, in child processes (fork) under an address-space limit of
    their size after set-up plus ``headroom`` and an alarm of ``slow`` seconds per case. A child that dies or stops
    making progress is a finding (``crash``/``hang``) at the case it was running; the next child goes on after it.
    ``save``: a folder where the first input of every new finding kind is written, minimized."""
    mp = multiprocessing.get_context("fork")
    total = _Result()
    start = 0
    while start < cases:
        progress = mp.Value("q", start)
        recv, send = mp.Pipe(duplex=False)
        p = mp.Process(target=_child, args=(name, start, cases, seed, slow, headroom,
                                            str(save) if save else None, progress, send))  # fmt: skip
        p.start()
        send.close()
        last, since = -1, time.monotonic()
        res: _Result | None = None
        while True:
            if recv.poll(0.5):
                try:
                    res = recv.recv()
                except EOFError:
                    res = None
                break
            if not p.is_alive():
                break
            if progress.value != last:
                last, since = progress.value, time.monotonic()
            elif time.monotonic() - since > 3 * slow + 60:  # the alarm did not fire: stuck in C
                p.kill()
                break
        p.join()
        if res is not None:
            _merge(total, res)
            break
        i = int(progress.value)
        kind = "hang" if p.exitcode == -signal.SIGKILL else f"crash (exit {p.exitcode})"
        total.add_finding(kind, i, f"case {i}")
        total.cases += 1
        start = i + 1
    return {
        "target": name,
        "what": TARGETS[name].what,
        "cases": total.cases,
        "accepted": total.accepted,
        "refused": total.refused,
        "findings": sum(f["count"] for f in total.findings.values()),
        "finding_kinds": total.findings,
        "cases_per_s": round(total.cases / total.seconds, 1) if total.seconds else None,
        "seconds": round(total.seconds, 1),
        "setup_s": round(total.setup_s, 1),
        "peak_rss_mib": round(total.peak_rss_mib),
        "rss_after_setup_mib": round(total.base_rss_mib),
    }


def _merge(total: _Result, res: _Result) -> None:
    total.cases += res.cases
    total.accepted += res.accepted
    total.refused += res.refused
    for kind, f in res.findings.items():
        if kind in total.findings:
            total.findings[kind]["count"] += f["count"]
        else:
            total.findings[kind] = f
    total.seconds += res.seconds
    total.setup_s += res.setup_s
    total.peak_rss_mib = max(total.peak_rss_mib, res.peak_rss_mib)
    total.base_rss_mib = max(total.base_rss_mib, res.base_rss_mib)


def replay_corpus(folder: str | Path, *, slow: float = 10.0, headroom: int = 2 << 30) -> dict[str, list[Any]]:
    """Every file of ``folder/<target>/`` through its target, in a forked child under the same limits as the
    fuzzer: ``target -> [(file, outcome, detail), ...]``."""
    mp = multiprocessing.get_context("fork")
    out: dict[str, list[Any]] = {}
    for sub in sorted(Path(folder).iterdir()):
        if not sub.is_dir():
            continue
        recv, send = mp.Pipe(duplex=False)
        p = mp.Process(target=_replay_child, args=(sub.name, sub, slow, headroom, send))
        p.start()
        send.close()
        try:
            out[sub.name] = recv.recv() if recv.poll(600) else [(str(sub), "finding", "no answer in 600 s")]
        except EOFError:
            out[sub.name] = [(str(sub), "finding", f"crash (exit {p.exitcode})")]
        p.join(5)
        if p.is_alive():
            p.kill()
    return out


def _replay_child(name: str, sub: Path, slow: float, headroom: int, conn: Any) -> None:
    target = TARGETS[name]
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"corpus-{name}-") as d:
        ctx = target.setup(Path(d))
        limit = _vm_size() + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        for f in sorted(sub.iterdir()):
            t0 = time.perf_counter()
            outcome, detail = replay(target, ctx, f.read_bytes(), slow=slow)
            rows.append((f.name, outcome, detail, round(time.perf_counter() - t0, 3)))
    conn.send(rows)
