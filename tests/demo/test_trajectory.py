"""The demo trajectory: varied captions, and a real ``open_clip_train`` run that leaves trained checkpoints.

The trajectories feed the demo and the benchmarks, so these tests check what those rely on: captions that
touch thousands of token-table rows, the trainer's own checkpoint layout, and weights that actually move.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn")
pd = pytest.importorskip("pandas")

from ckptstore.demo import trajectory as tj  # noqa: E402
from ckptstore.demo._train_entry import split_config_dirs  # noqa: E402


def test_dataset_captions_use_thousands_of_tokens(tmp_path: Path) -> None:
    csv = tj.write_digits_dataset(tmp_path / "data")
    df = pd.read_csv(csv, sep=tj.CSV_SEPARATOR)
    assert list(df.columns) == ["filepath", "title"]
    assert len(df) == 1797
    assert all(Path(p).is_file() for p in df.filepath[:20])
    from sklearn.datasets import load_digits

    for title, y in zip(df.title, load_digits().target, strict=True):
        assert tj.DIGIT_NAMES[y] in title.split() or str(y) in title.split()
    ids = open_clip.tokenize(df.title.tolist(), context_length=tj.CONTEXT_LENGTH)
    assert torch.unique(ids).numel() > 2000
    # Some captions fill the context, so every text position gets gradient.
    assert int((ids[:, -1] != 0).sum()) > 0
    # Same seed, same dataset.
    again = tj.write_digits_dataset(tmp_path / "again")
    assert pd.read_csv(again, sep=tj.CSV_SEPARATOR).title.tolist() == df.title.tolist()


def test_caption_vocabulary_is_single_tokens() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    words = tj.caption_vocabulary()
    encoder = SimpleTokenizer(context_length=tj.CONTEXT_LENGTH).encoder
    assert len(words) > 30000
    assert all(f"{w}</w>" in encoder for w in words)


def test_model_sizes() -> None:
    tiny = sum(p.numel() for p in tj.build_model("tiny").parameters())
    small = sum(p.numel() for p in tj.build_model("small").parameters())
    assert 1_000_000 < tiny - tj.VOCAB_SIZE * 128 < 3_000_000
    assert 10_000_000 < small < 20_000_000
    with pytest.raises(tj.TrajectoryConfigError):
        tj.tiny_model_config("huge")


def test_entry_splits_config_dirs() -> None:
    assert split_config_dirs(["--model-config-dir", "a", "--epochs", "2", "--model-config-dir=b"]) == (
        ["a", "b"],
        ["--epochs", "2"],
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_training_writes_trained_checkpoints(tmp_path: Path) -> None:
    _proc, run_dir = tj.run_open_clip_train(tmp_path, epochs=2, size="tiny", n_images=640, val_samples=128)
    assert run_dir == tmp_path / "logs" / "tiny-csv-e2-s0"
    ckpts = run_dir / "checkpoints"
    assert (run_dir / "out.log").is_file()
    assert (run_dir / "params.txt").is_file()
    assert len((ckpts / "results.jsonl").read_text().splitlines()) == 2  # one evaluation per epoch
    first = torch.load(ckpts / "epoch_1.pt", map_location="cpu", weights_only=True)
    second = torch.load(ckpts / "epoch_2.pt", map_location="cpu", weights_only=True)
    for ck in (first, second):
        assert {"epoch", "name", "state_dict", "optimizer"} <= set(ck)
    assert (first["epoch"], second["epoch"]) == (1, 2)
    assert first["state_dict"].keys() == tj.build_model("tiny").state_dict().keys()
    changed = [k for k, v in first["state_dict"].items() if not torch.equal(v, second["state_dict"][k])]
    assert len(changed) == len(first["state_dict"])
    cov = tj.gradient_coverage(ckpts / "epoch_1.pt", ckpts / "epoch_2.pt")
    assert cov["tensors_without_gradient"] == 0
    # A second run under the same name is refused, not silently mixed into the first.
    with pytest.raises(tj.TrainingRunError):
        tj.run_open_clip_train(tmp_path, epochs=2, size="tiny", n_images=640)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ensure_trajectory_caches_finished_runs(tmp_path: Path) -> None:
    def ensure(progress: Callable[[str], None] | None = None) -> Path:
        return tj.ensure_trajectory(tmp_path, epochs=1, dataset="synthetic", n_images=128, val_samples=0,
                                    progress=progress)  # fmt: skip

    # Two callers at once (two test workers, two demos): one trains, the other waits for it and reuses its run.
    first: list[str] = []
    second: list[str] = []
    training = threading.Event()

    def first_progress(line: str) -> None:
        first.append(line)
        if line.startswith("not cached yet"):
            training.set()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(ensure, first_progress)
        assert training.wait(600), first
        b = pool.submit(ensure, second.append)
        ckpts = a.result(timeout=900)
        assert b.result(timeout=900) == ckpts
    assert first[0].startswith("not cached yet: training now")
    assert second[0] == "waiting: another process is training the same run", second
    assert len(second) == 2 and second[1].startswith("cached: trained by another process while this one waited")
    assert (ckpts / "epoch_1.pt").is_file()
    key = ckpts.parents[2].name
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", key]  # no temporary leftovers
    assert [p.name for p in (tmp_path / ".locks").iterdir()] == [key]  # the build lock of this key only
    stamp = (ckpts / "epoch_1.pt").stat().st_mtime_ns
    assert ensure() == ckpts
    assert (ckpts / "epoch_1.pt").stat().st_mtime_ns == stamp  # reused, not retrained
