"""`ckpt ingest` of foreign or damaged files: one clear error line, exit status 2, and a store left exactly as it
was. Plus the good path: ingest a synthetic open_clip_train checkpoint and export it back bit-identically."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from ckptstore.cli.main import main  # noqa: E402

CkptRunner = Callable[..., tuple[int, str, str]]


class Custom:  # not allowed by torch.load(weights_only=True)
    def __init__(self) -> None:
        self.x = 1


@pytest.fixture
def ckpt(capfd: pytest.CaptureFixture[str]) -> CkptRunner:
    """Run the CLI in-process; return (exit status, stdout, stderr) captured at the file-descriptor level."""

    def run(*argv: Any) -> tuple[int, str, str]:
        capfd.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capfd.readouterr()
        return rc, out, err

    return run


def openclip_checkpoint(epoch: int, seed: int = 0, steps: int = 2) -> dict[str, Any]:
    """What open_clip_train saves: epoch, name, state_dict, optimizer (+ scaler, global_step)."""
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {
            "visual": torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.LayerNorm(16)),
            "text": torch.nn.Embedding(30, 16),
            "proj": torch.nn.Linear(16, 8, bias=False),
        }
    )
    logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
    params = [*model.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    for i in range(steps):
        x = torch.randn(4, 12)
        t = torch.randint(0, 30, (4,))
        img = model["proj"](model["visual"](x))
        txt = model["proj"](model["text"](t))
        loss = -(logit_scale.exp() * (img * txt).sum(-1)).mean() + 0.01 * i
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.logit_scale"] = logit_scale.detach().clone()
    sd["module.attn_mask"] = torch.full((5, 5), float("-inf")).triu(1)
    sd["module.half"] = torch.randn(3, 3).to(torch.bfloat16)
    return {
        "epoch": epoch,
        "name": "synthetic-clip",
        "state_dict": sd,
        "optimizer": opt.state_dict(),
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "global_step": 100 * epoch,
    }


def write_pt(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture
def store(tmp_path: Path, ckpt: CkptRunner) -> Path:
    """A store that already holds one ingested checkpoint (so its lock file and packs exist)."""
    path = tmp_path / "store"
    good = write_pt(tmp_path / "logs" / "good" / "checkpoints" / "epoch_1.pt", openclip_checkpoint(1))
    rc, _, err = ckpt("ingest", "--init", "--store", path, good)
    assert rc == 0, err
    return path


def _truncated(path: Path) -> None:
    write_pt(path, openclip_checkpoint(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not a checkpoint\n" * 20)


def _empty(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _custom_class(path: Path) -> None:
    write_pt(path, {"epoch": 1, "state_dict": {"w": torch.ones(2)}, "optimizer": {}, "hook": Custom()})


def _no_state_dict(path: Path) -> None:
    write_pt(path, {"epoch": 1, "model": {"w": torch.ones(2)}, "optimizer": {}})


def _state_dict_not_a_mapping(path: Path) -> None:
    write_pt(path, {"epoch": 1, "state_dict": torch.ones(3)})


def _not_a_dict(path: Path) -> None:
    write_pt(path, [torch.ones(2), torch.zeros(2)])


def _evil_key(path: Path) -> None:
    ck = openclip_checkpoint(1)
    ck["state_dict"]["../evil"] = torch.ones(2)
    write_pt(path, ck)


def _slash_key(path: Path) -> None:
    ck = openclip_checkpoint(1)
    ck["state_dict"]["a/b"] = torch.ones(2)
    write_pt(path, ck)


def _unstorable_value(path: Path) -> None:
    ck = openclip_checkpoint(1)
    ck["state_dict"]["module.weird"] = {1, 2, 3}  # weights_only accepts a set; the format has no sets
    write_pt(path, ck)


def _no_epoch_or_step(path: Path) -> None:
    ck = openclip_checkpoint(1)
    del ck["epoch"], ck["global_step"]
    write_pt(path, ck)


HOSTILE: dict[str, Callable[[Path], None]] = {
    "text_file": _text,
    "empty_file": _empty,
    "truncated_pt": _truncated,
    "custom_class_pickle": _custom_class,
    "no_state_dict": _no_state_dict,
    "state_dict_not_a_mapping": _state_dict_not_a_mapping,
    "not_a_dict": _not_a_dict,
    "dotdot_key": _evil_key,
    "slash_key": _slash_key,
    "unstorable_value": _unstorable_value,
    "no_epoch_or_step": _no_epoch_or_step,
}


def _assert_one_line_error(err: str, path: Path) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("ckpt ingest: error:"), line
    assert str(path) in line or path.name in line, f"the error does not name the file: {line}"
    return line


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_file_refused_store_unchanged(
    kind: str, tmp_path: Path, store: Path, ckpt: CkptRunner, snapshot: Any
) -> None:
    bad = tmp_path / "logs" / "victim" / "checkpoints" / "epoch_1.pt"
    HOSTILE[kind](bad)
    before = snapshot(store)
    rc, out, err = ckpt("ingest", "--store", store, bad)
    assert rc == 2, (out, err)
    _assert_one_line_error(err, bad)
    assert snapshot(store) == before, "a refused ingest changed the store"
    rc, out, _ = ckpt("ls", "--store", store, "--json")
    assert rc == 0 and '"good@100"' in out and "victim" not in out


@pytest.mark.parametrize("kind", ["text_file", "custom_class_pickle", "truncated_pt"])
def test_error_line_is_plain_text(kind: str, tmp_path: Path, store: Path, ckpt: CkptRunner) -> None:
    """The error line goes to logs: no terminal escape sequences or other control characters."""
    bad = tmp_path / "logs" / "victim" / "checkpoints" / "epoch_1.pt"
    HOSTILE[kind](bad)
    rc, _, err = ckpt("ingest", "--store", store, bad)
    assert rc == 2
    line = _assert_one_line_error(err, bad)
    assert all(c.isprintable() for c in line), repr(line)


def test_hostile_file_in_a_subprocess(tmp_path: Path, store: Path, snapshot: Any) -> None:
    """The real command line (``python -m ckptstore.cli``): nothing else reaches stderr."""
    bad = tmp_path / "logs" / "victim" / "checkpoints" / "epoch_3.pt"
    _custom_class(bad)
    before = snapshot(store)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptstore.cli", "ingest", "--store", str(store), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CKPT_TRACEBACK": ""},
    )
    assert proc.returncode == 2, proc.stderr
    _assert_one_line_error(proc.stderr, bad)
    assert snapshot(store) == before


def test_missing_path(tmp_path: Path, store: Path, ckpt: CkptRunner, snapshot: Any) -> None:
    before = snapshot(store)
    rc, _, err = ckpt("ingest", "--store", store, tmp_path / "nope" / "epoch_1.pt")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "nope" in err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    rc, _, err = ckpt("ingest", "--store", store, empty)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert snapshot(store) == before


def test_ingest_without_store(tmp_path: Path, ckpt: CkptRunner) -> None:
    good = write_pt(tmp_path / "run" / "epoch_1.pt", openclip_checkpoint(1))
    rc, _, err = ckpt("ingest", "--store", tmp_path / "nostore", good)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nostore").exists()


def test_bad_file_after_good_one(tmp_path: Path, ckpt: CkptRunner, bits_equal: Any) -> None:
    """A folder with a good epoch_1 and a damaged epoch_2: epoch_1 is stored, the error names epoch_2."""
    run = tmp_path / "logs" / "mixed" / "checkpoints"
    good = write_pt(run / "epoch_1.pt", openclip_checkpoint(1))
    _truncated(run / "epoch_2.pt")
    store = tmp_path / "store"
    rc, _, err = ckpt("ingest", "--init", "--store", store, run.parent)
    assert rc == 2
    line = _assert_one_line_error(err, run / "epoch_2.pt")
    assert "epoch_1.pt" not in line
    import ckptstore

    s = ckptstore.open_store(store)
    assert s.steps("mixed") == [100]
    orig = torch.load(good, weights_only=True)
    assert bits_equal(s.load("mixed@100")["state_dict"]["module.proj.weight"], orig["state_dict"]["module.proj.weight"])
    assert s.verify()["ok"]


# -------------------------------------------------------------------------------------------- the good path
def test_ingest_export_roundtrip(tmp_path: Path, ckpt: CkptRunner, assert_same_state: Any, snapshot: Any) -> None:
    run_dir = tmp_path / "logs" / "clip-run" / "checkpoints"
    files = [write_pt(run_dir / f"epoch_{e}.pt", openclip_checkpoint(e, steps=1 + e)) for e in (1, 2)]
    store = tmp_path / "store"
    rc, out, err = ckpt("ingest", "--init", "--store", store, run_dir.parent, "--json")
    assert rc == 0, err
    import json

    rows = json.loads(out)
    assert [r["ref"] for r in rows] == ["clip-run@100", "clip-run@200"]
    assert [r["epoch"] for r in rows] == [1, 2]

    for f, ref in zip(files, ["clip-run@100", "clip-run@200"], strict=True):
        original = torch.load(f, map_location="cpu", weights_only=True)
        (tmp_path / "export").mkdir(exist_ok=True)
        for fmt in ("pt",):
            out_pt = tmp_path / "export" / f"{ref.replace('@', '_')}.{fmt}.pt"
            rc, _, err = ckpt("export", "--store", store, ref, "--format", fmt, "-O", out_pt)
            assert rc == 0, err
            exported = torch.load(out_pt, map_location="cpu", weights_only=True)
            assert list(exported) == list(original)
            assert list(exported["state_dict"]) == list(original["state_dict"])
            assert_same_state(exported, original)
            assert isinstance(exported["optimizer"]["param_groups"][0]["betas"], tuple)
        st_path = tmp_path / "export" / f"{ref.replace('@', '_')}.safetensors"
        rc, _, err = ckpt("export", "--store", store, ref, "--format", "safetensors", "-O", st_path)
        assert rc == 0, err
        from safetensors.torch import load_file

        weights = load_file(str(st_path))
        assert set(weights) == set(original["state_dict"])
        for k, v in original["state_dict"].items():
            assert_same_state(weights[k], v)

    # the second epoch is a delta against the first
    import ckptstore

    s = ckptstore.open_store(store)
    m = s.resolve("clip-run@200")
    assert any(rec.get("refs") for rec in m.objects.values())
    # ingesting again skips what is stored and changes nothing
    before = snapshot(store)
    rc, out, _ = ckpt("ingest", "--store", store, run_dir)
    assert rc == 0 and out.count("already stored") == 2
    assert snapshot(store) == before


def test_export_errors(tmp_path: Path, store: Path, ckpt: CkptRunner) -> None:
    rc, _, err = ckpt("export", "--store", store, "good@999", "-O", tmp_path / "x.pt")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "good@999" in err
    assert not (tmp_path / "x.pt").exists()
    rc, _, err = ckpt("export", "--store", store, "bad ref@", "-O", tmp_path / "x.pt")
    assert rc == 2 and len(err.strip().splitlines()) == 1
