"""A real ``open_clip_train`` run with a custom model (``--model local-dir:RELATIVE``), stored from another folder:
the model config is training state, so ingest and watch capture its content into the metadata, and ``ckpt report``
and ``ckpt release`` work from any folder, after the training folder is gone (issue 14, item 6).

Before the fix both commands stopped with ``[Errno 2] No such file or directory: '<dir>/open_clip_config.json'``:
the stored model name was looked up relative to the folder the command ran in.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
from pathlib import Path

import pytest

torch = importlib.import_module("torch")
open_clip = importlib.import_module("open_clip")
importlib.import_module("open_clip_train")
importlib.import_module("pandas")

import ckptstore  # noqa: E402
from ckptstore.cli.main import main as ckpt_main  # noqa: E402
from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.integrations import openclip  # noqa: E402
from ckptstore.release import resolve_model_config  # noqa: E402

pytestmark = pytest.mark.slow

MODEL_DIR = "configs/my-tiny"  # relative to the folder the trainer runs in
RUN = "localdir-run"


def ckpt(*argv: str) -> tuple[int, str, str]:
    """``ckpt ARGV`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ckpt_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def config_file() -> dict[str, object]:
    return {"model_cfg": tj.tiny_model_config("tiny"), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir where open_clip_train ran with ``--model local-dir:configs/my-tiny`` (2 epochs, 128 images)."""
    work = tmp_path_factory.mktemp("train")
    (work / MODEL_DIR).mkdir(parents=True)
    (work / MODEL_DIR / "open_clip_config.json").write_text(json.dumps(config_file()))
    tj.run_open_clip_train(
        work, epochs=2, n_images=128, val_samples=0, name=RUN, extra_args=["--model", f"local-dir:{MODEL_DIR}"]
    )
    params = openclip.parse_params_txt(work / "logs" / RUN / "params.txt")
    assert params["model"] == f"local-dir:{MODEL_DIR}"
    return work


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder is an unrelated one: nothing relative to it names the model's folder."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_relative_local_dir_resolves_against_the_trainer_folder(train_dir: Path, elsewhere: Path) -> None:
    run_dir = train_dir / "logs" / RUN
    hp = openclip.parse_params_txt(run_dir / "params.txt")
    assert openclip.trainer_dirs(run_dir, hp)[0] == train_dir
    found = openclip.local_dir_config(hp["model"], run_dir, hp)
    assert found is not None and found[0] == config_file()
    assert found[1] == (train_dir / MODEL_DIR / "open_clip_config.json").resolve()
    # open_clip's own lookup is relative to this process's folder: the failure the issue saw
    with pytest.raises(FileNotFoundError):
        open_clip.get_model_config(hp["model"])


def test_ingest_from_elsewhere_then_report_and_release_after_the_folder_is_gone(
    train_dir: Path, elsewhere: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "train-copy"  # deleted below; the module's run stays for the other tests
    shutil.copytree(train_dir, copy)
    store = tmp_path / "store"
    rc, out, err = ckpt("ingest", str(copy / "logs" / RUN), "--store", str(store), "--init", "--json")
    assert rc == 0, err
    s = ckptstore.open_store(store)
    for step in s.steps(RUN):
        meta = s.manifest(RUN, step).metadata
        assert meta["model"] == f"local-dir:{MODEL_DIR}"
        assert meta["model_config"] == config_file()  # the content, not a path
        assert meta["source"]["model_config"] == str((copy / MODEL_DIR / "open_clip_config.json").resolve())
    shutil.rmtree(copy)

    rc, out, err = ckpt("release", RUN, "--store", str(store), "--select", "2", "--out", str(tmp_path / "rel"))
    assert rc == 0, err
    folders = sorted(p for p in (tmp_path / "rel").iterdir() if p.is_dir())
    assert folders, err
    written = json.loads((folders[-1] / "open_clip_config.json").read_text())
    assert written["model_cfg"] == config_file()["model_cfg"]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folders[-1]}")
    sd = s.load(f"{RUN}@latest")["state_dict"]
    got = {k.removeprefix("module."): v for k, v in sd.items()}
    for k, v in model.state_dict().items():
        assert v.numpy().tobytes() == got[k].numpy().tobytes(), k

    page = tmp_path / "report.html"
    rc, out, err = ckpt("report", RUN, "--store", str(store), "--out", str(page), "--no-spectral", "--json")
    assert rc == 0, err
    blob = json.loads(out)
    assert blob.get("representations") is not None, blob.get("skipped")
    assert "representations" not in (blob.get("skipped") or {})
    assert page.is_file()


def test_an_uncaptured_config_is_a_clear_error_and_a_skipped_section(
    train_dir: Path, elsewhere: Path, tmp_path: Path
) -> None:
    """A store made before the capture (no ``model_config`` in the metadata) and a training folder that is gone:
    release says which model, why and what to do; report skips the model sections with a one-line note."""
    store = tmp_path / "store"
    rc, out, err = ckpt("ingest", str(train_dir / "logs" / RUN), "--store", str(store), "--init")
    assert rc == 0, err
    s = ckptstore.open_store(store)
    for step in s.steps(RUN):
        s.update_metadata(f"{RUN}@{step}", lambda md: md.pop("model_config"))
    meta = dict(s.manifest(RUN, s.steps(RUN)[-1]).metadata)
    meta["source"] = {"kind": "open_clip_train", "file": str(tmp_path / "gone" / "logs" / RUN / "epoch_2.pt")}
    with pytest.raises(ckptstore.CkptStoreError, match="local-dir:configs/my-tiny") as err:
        resolve_model_config(meta, ref="r")
    assert "--model-config" in str(err.value) and "Errno" not in str(err.value)

    shutil.move(str(train_dir), str(tmp_path / "moved"))  # the training folder is gone from where it was
    try:
        rc, out, err = ckpt("release", RUN, "--store", str(store), "--select", "1", "--out", str(tmp_path / "rel"))
        assert rc == 2 and "Errno" not in err and "--model-config" in err, err
        assert len(err.strip().splitlines()) == 1, err
        rc, out, err = ckpt("report", RUN, "--store", str(store), "--out", str(tmp_path / "r.html"), "--no-spectral",
                       "--json")  # fmt: skip
        assert rc == 0, err
        blob = json.loads(out)
        note = blob["skipped"]["representations"]
        assert "local-dir:configs/my-tiny" in note and "\n" not in note and "Errno" not in note
        assert blob["weights"] is not None
    finally:
        shutil.move(str(tmp_path / "moved"), str(train_dir))


def test_watch_captures_the_config_too(train_dir: Path, elsewhere: Path, tmp_path: Path) -> None:
    from ckptstore.integrations.watch import Watcher

    store = ckptstore.create_store(tmp_path / "store")
    w = Watcher(store, train_dir / "logs" / RUN, settle=0.0)
    w.scan(final=True)
    assert store.steps(RUN), [str(e) for e in w.events]
    for step in store.steps(RUN):
        assert store.manifest(RUN, step).metadata["model_config"] == config_file()
