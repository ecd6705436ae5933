"""The demo: train a small OpenCLIP model on CPU, store its whole trajectory, show what was saved and how small.

    python -m ckptstore.demo [--epochs 4] [--out demo-out]

Trains with the real, unmodified ``open_clip_train`` on scikit-learn's digits with varied captions (cached after
the first run), ingests every ``epoch_N.pt`` into a store, prints the ``ckpt ls`` table and the bytes saved,
verifies every hash, checks that an export of the newest checkpoint is bit-identical to the original file, and
writes an HTML report of the run (weight dynamics, stability flags, CKA, zero-shot, transfer; --no-report skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ckptstore.format.manifest import CheckpointInfo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ckptstore.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (one checkpoint each)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"], help="model size")
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="where the store and exports go")
    ap.add_argument("--no-report", dest="report", action="store_false", help="skip the HTML report of the stored run")
    a = ap.parse_args(argv)

    import torch

    from ckptstore import create_store
    from ckptstore.demo.trajectory import ensure_trajectory
    from ckptstore.integrations import openclip

    t0 = time.perf_counter()
    print(f"== training a {a.size} OpenCLIP model for {a.epochs} epochs with open_clip_train (CPU) ...", flush=True)
    ckpt_dir = ensure_trajectory(epochs=a.epochs, size=a.size, progress=lambda line: print(f"   {line}", flush=True))
    files = openclip.epoch_files(ckpt_dir)
    print(f"   {len(files)} checkpoints in {ckpt_dir} ({time.perf_counter() - t0:.0f}s)")

    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    store_path = a.out / "store"
    store = create_store(store_path)
    print(f"\n== ingesting into {store_path} ...", flush=True)
    t1 = time.perf_counter()

    def report(f: Path, info: CheckpointInfo | None) -> None:
        if info is not None:
            mb_in, mb_out = info.logical_bytes / 1e6, info.stored_bytes / 1e6
            print(f"   {f.name} -> {info.ref} ({mb_in:.1f} MB -> {mb_out:.1f} MB)", flush=True)

    openclip.ingest(store, [ckpt_dir], run="demo", on_file=report)
    print(f"   ingested in {time.perf_counter() - t1:.1f}s\n")

    for info in store.checkpoints("demo"):
        print(f"   {info.ref:<12} {info.logical_bytes / 1e6:8.1f} MB -> {info.stored_bytes / 1e6:6.1f} MB", flush=True)
    pt_bytes = sum(f.stat().st_size for f in files)
    stored = store.stats("demo")["pack_bytes"]
    print(
        f"\n{len(files)} epoch_N.pt files: {pt_bytes / 1e6:.1f} MB; stored losslessly in {stored / 1e6:.1f} MB "
        f"({pt_bytes / stored:.2f}x smaller, {100 * (1 - stored / pt_bytes):.0f}% saved)"
    )

    res = store.verify("demo")
    print(
        f"verify: {res['checkpoints']} checkpoints, {res['objects']} objects, "
        f"{'all hashes match' if res['ok'] else res['problems']}"
    )
    out = openclip.export_pt(store, "demo@latest", a.out / "latest.pt")
    original = torch.load(files[-1], weights_only=True)
    exported = torch.load(out, weights_only=True)
    from ckptstore.torch import same_bits

    same = all(same_bits(original["state_dict"][k], exported["state_dict"][k]) for k in original["state_dict"])
    print(f"export demo@latest -> {out}: state_dict bit-identical to {files[-1].name}: {same}")
    if a.report:
        page = a.out / "report.html"
        print(f"\n== analysing the stored run (what `ckpt report demo -O {page}` does) ...", flush=True)
        from ckptstore.analysis.report.run import report_run

        analysed = report_run(store, "demo", stage=_stage)
        with _stage("figures and page"):
            print(f"   {analysed.write(page)}")
    print(f"\ndone in {time.perf_counter() - t0:.0f}s.")
    print(f"Try: scripts/ckpt --help; scripts/ckpt show demo@latest --store {store_path}")
    print(f'(or put ckpt on PATH: source scripts/activate, or export PATH="{Path(sys.prefix) / "bin"}:$PATH")')
    return 0 if res["ok"] and same else 1


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """A line when a report stage starts and one when it ends, so the demo never goes silent."""
    print(f"   {what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"   {what}: done in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
