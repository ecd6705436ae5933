"""The committed corpus of hostile inputs (tests/corpus/<target>/: minimized findings of
``benchmarks/fuzz_inputs.py`` and hand-written nasty ones) each gives a clear library error, under the fuzzer's
address-space limit and a per-file alarm. A file named ``ok-*`` is odd but valid input that once raised a
foreign exception: it must now be taken (ingested, parsed), not refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptstore.testing import fuzz_inputs

CORPUS = Path(__file__).parent.parent / "corpus"


def test_corpus_is_small_and_named_by_target() -> None:
    files = [f for f in CORPUS.rglob("*") if f.is_file()]
    assert files and sum(f.stat().st_size for f in files) < 400_000
    assert {f.parent.name for f in files} <= set(fuzz_inputs.TARGETS)


@pytest.mark.parametrize("target", sorted(p.name for p in CORPUS.iterdir() if p.is_dir()))
def test_every_corpus_file_is_refused_with_a_library_error(target: str, tmp_path: Path) -> None:
    only = tmp_path / "c" / target
    only.mkdir(parents=True)
    for f in (CORPUS / target).iterdir():
        (only / f.name).write_bytes(f.read_bytes())
    rows = fuzz_inputs.replay_corpus(tmp_path / "c", slow=10.0)[target]
    assert len(rows) == len(list(only.iterdir()))
    bad = [r for r in rows if r[1] != ("accepted" if r[0].startswith("ok-") else "refused")]
    assert not bad, bad
    assert all((r[2] or r[1] == "accepted") and r[3] < 10.0 for r in rows)  # refusals say why
