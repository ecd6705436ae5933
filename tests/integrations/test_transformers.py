"""The transformers callback against the real ``Trainer`` on a tiny BERT on CPU: saving by policy, eval metrics
added to the saved steps, bit-exact weights, and ``trainer.train(resume_from_checkpoint=export)`` resuming."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import ckptstore  # noqa: E402
from ckptstore.integrations.transformers import CkptStoreCallback, export_checkpoint_dir  # noqa: E402

STEPS = 12


class Toy(torch.utils.data.Dataset):  # type: ignore[misc]
    """Label: does token 5 occur in the sequence?"""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (64, 12), generator=g)
        self.labels = (self.ids == 5).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def model() -> Any:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def args(out: Path, **kw: Any) -> Any:
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
                lr_scheduler_type="cosine", warmup_steps=2, logging_steps=2, save_strategy="no", report_to="none",
                use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    m = model()
    cb = CkptStoreCallback(tmp / "s.ckpt", "bert", policy="steps:4, metric:eval_loss:rel=0.5, last")
    trainer = transformers.Trainer(model=m, args=args(tmp / "out", eval_strategy="steps", eval_steps=4),
                                   train_dataset=Toy(), eval_dataset=Toy(), callbacks=[cb])  # fmt: skip
    trainer.train()
    return tmp / "s.ckpt", m, tmp


def test_saves_by_policy_with_metrics(trained: tuple[Path, Any, Path]) -> None:
    path, _m, _tmp = trained
    store = ckptstore.open_store(path)
    infos = store.checkpoints("bert")
    assert [i.step for i in infos] == [4, 8, 12]
    assert infos[0].metadata["save_reason"] == "every 4 steps (step 4)"
    assert infos[-1].metadata["save_reason"] == "every 4 steps (step 12); end of training"
    for i in infos:
        m = i.metadata["metrics"]
        assert "eval_loss" in m and "loss" in m and "learning_rate" in m  # evaluation arrived after the save
        assert i.metadata["hparams"]["max_steps"] == STEPS and i.metadata["hf_config"]["hidden_size"] == 16
        assert i.metadata["epoch"] == pytest.approx(i.step / 8)
    state = store.load("bert@8", tensors="torch")
    assert {"model", "optimizer", "scheduler", "trainer_state", "rng"} <= set(state)
    assert state["trainer_state"]["global_step"] == 8


def test_stored_weights_are_bit_exact(
    trained: tuple[Path, Any, Path], assert_same_state: Callable[[object, object], None]
) -> None:
    path, m, _tmp = trained
    state = ckptstore.open_store(path).load("bert@latest", tensors="torch")
    assert_same_state(state["model"], dict(m.state_dict()))


def test_train_resumes_from_an_exported_checkpoint_dir(trained: tuple[Path, Any, Path]) -> None:
    path, _m, tmp = trained
    out = export_checkpoint_dir(ckptstore.open_store(path), "bert@8", tmp / "out2" / "checkpoint-8")
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth",
            "config.json"} <= {p.name for p in out.iterdir()}  # fmt: skip
    trainer = transformers.Trainer(model=model(), args=args(tmp / "out2"), train_dataset=Toy())
    trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == STEPS
    logged = [h["step"] for h in trainer.state.log_history if "loss" in h]
    # Earlier steps come back with trainer_state; 10 and 12 were trained after the resume.
    assert logged[-2:] == [10, 12] and all(s < 10 for s in logged[:-2])
