"""The demo's training reports progress from the trainer's own log, and says truthfully whether it was cached."""

from __future__ import annotations

from pathlib import Path

from ckptstore.demo import trajectory as tj


def test_training_prints_a_line_per_log_line_and_the_cache_label_tells_the_truth(tmp_path: Path) -> None:
    lines: list[str] = []
    kwargs = {"epochs": 2, "dataset": "synthetic", "n_images": 128, "val_samples": 0, "batch_size": 32}
    ckpts = tj.ensure_trajectory(tmp_path, progress=lines.append, **kwargs)  # type: ignore[arg-type]
    assert (ckpts / "epoch_2.pt").is_file()
    assert lines[0].startswith("not cached yet: training now")
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert any(line.startswith("epoch 1/2: ") for line in epoch_lines), lines
    assert epoch_lines[-1].startswith("epoch 2/2: 128/128 samples, loss "), lines
    assert all(" s" in line for line in epoch_lines)
    assert any("s left" in line for line in epoch_lines[:-1]), lines  # an ETA while work remains

    again: list[str] = []
    assert tj.ensure_trajectory(tmp_path, progress=again.append, **kwargs) == ckpts  # type: ignore[arg-type]
    assert len(again) == 1 and again[0].startswith("cached: trained by an earlier run")
