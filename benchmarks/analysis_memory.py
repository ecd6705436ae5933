"""Peak memory and wall time of ``analyze_weights`` + ``analyze_stability`` on a 20-checkpoint run.

The acceptance target of the analyses (docs/analysis-dynamics.md): reading a trajectory tensor by tensor, the peak
stays near a few checkpoints' weights, however many checkpoints the run has. This script

1. ingests the cached 20-epoch tiny OpenCLIP run (``ensure_trajectory(epochs=20, size="tiny", n_images=128)``, or
   ``--checkpoints DIR``) into a store under ``--work``;
2. runs each measurement in a fresh subprocess that imports everything and opens the trajectory first, then resets
   its peak RSS (``/proc/self/clear_refs``) and records its RSS as the baseline;
3. reports the peak RSS above that baseline (``VmHWM``), and the peaks of its anonymous and file-backed parts
   (sampled), against the size of one checkpoint's weights (Σ numel × itemsize of the weight tensors).

Rows: ``floor`` only reads (and touches) every tensor through every checkpoint (what any name-major analysis pays:
the store's delta decoding, or the .pt files' mmap pages); ``analysis`` runs ``analyze_weights`` (spectra and PCA
on) and ``analyze_stability``. ``store`` reads the store run, ``files`` the ``epoch_N.pt`` files;
``+mmap-threshold`` repeats a row with ``MALLOC_MMAP_THRESHOLD_`` set, which stops glibc from keeping freed tensor
buffers in its heap (the difference is memory the allocator holds, not memory the analysis uses). Peaks are also
given as multiples of the largest weight tensor, which is what bounds a name-major analysis.

``--synthetic`` measures a generated run instead: 20 checkpoints (``--count``) with the tensor names and shapes of
open_clip's ViT-B-16, every width scaled by ``--width-factor`` (default 0.5: 143 MB of float32 weights per
checkpoint). The vocabulary is scaled by the same factor (or set with ``--vocab``), so the token table keeps its
share of the weights (16.9 % in ViT-B-16; scaling only the widths would make it 29 % at 0.5, 45 % at 0.25). Each
checkpoint is the previous one × (1 - decay) plus small Gaussian noise; the run is saved to a store
(``create_store(...).save``) and as ``epoch_N.pt`` files in the work folder, and deleted afterwards unless
``--keep``.

    python benchmarks/analysis_memory.py [--checkpoints DIR | --synthetic [--width-factor F]] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
RUN = "bench"


# ---------------------------------------------------------------------------------------------- child process
def _status() -> dict[str, float]:
    """MB values of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) / 1024
    return out


def child(args: argparse.Namespace) -> None:
    import numpy as np  # noqa: F401  (imported before the baseline, like everything the measurement uses)
    import torch  # noqa: F401

    import ckptstore
    from ckptstore.analysis.stability import analyze_stability
    from ckptstore.analysis.trajectory import StoreTrajectory, open_trajectory
    from ckptstore.analysis.weights import analyze_weights

    traj = (
        StoreTrajectory(ckptstore.open_store(args.store), RUN)
        if args.child == "store"
        else open_trajectory(args.checkpoints)
    )
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    base = _status()
    peaks = {"RssAnon": base.get("RssAnon", 0.0), "RssFile": base.get("RssFile", 0.0)}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            now = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], now.get(k, 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    flags = None
    if args.mode == "floor":
        for w in traj.weights:
            for x in traj.iter_tensor(w.name):
                x.max(initial=0)  # touch every byte (an mmap'd file reads nothing until then)
    else:
        weights = analyze_weights(traj, spectral=not args.no_spectral)
        flags = len(analyze_stability(traj, weights=weights).flags)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    end = _status()
    print(json.dumps({
        "baseline_mb": base["VmRSS"], "peak_extra_mb": end["VmHWM"] - base["VmRSS"],
        "peak_anon_extra_mb": peaks["RssAnon"] - base.get("RssAnon", 0.0),
        "peak_file_extra_mb": peaks["RssFile"] - base.get("RssFile", 0.0),
        "wall_s": wall, "hwm_reset": reset, "flags": flags, "checkpoints": len(traj),
    }))  # fmt: skip


# ---------------------------------------------------------------------------------------------- parent
def default_checkpoints() -> Path:
    from ckptstore.demo import trajectory as tj

    return tj.ensure_trajectory(epochs=20, size="tiny", n_images=128)  # cached; trains (~2 min) the first time


def vit_b16_shapes(width_factor: float = 1.0, vocab: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """open_clip ViT-B-16's ``state_dict()`` names and shapes, in its order, with every width (768 vision, 512 text
    and embedding, their 4× MLPs) scaled by ``width_factor``; the vocabulary (49,408) too unless ``vocab`` is given.

    At ``width_factor=1`` this is exactly ``open_clip.create_model("ViT-B-16").state_dict()``'s list."""

    def width(x: int) -> int:
        return max(1, round(x * width_factor))

    vw, tw, ed = width(768), width(512), width(512)
    rows = vocab if vocab else width(49408)
    grid = 224 // 16

    def block(prefix: str, d: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.ln_1.weight", (d,)), (f"{prefix}.ln_1.bias", (d,)),
                (f"{prefix}.attn.in_proj_weight", (3 * d, d)), (f"{prefix}.attn.in_proj_bias", (3 * d,)),
                (f"{prefix}.attn.out_proj.weight", (d, d)), (f"{prefix}.attn.out_proj.bias", (d,)),
                (f"{prefix}.ln_2.weight", (d,)), (f"{prefix}.ln_2.bias", (d,)),
                (f"{prefix}.mlp.c_fc.weight", (4 * d, d)), (f"{prefix}.mlp.c_fc.bias", (4 * d,)),
                (f"{prefix}.mlp.c_proj.weight", (d, 4 * d)), (f"{prefix}.mlp.c_proj.bias", (d,))]  # fmt: skip

    out: list[tuple[str, tuple[int, ...]]] = [
        ("positional_embedding", (77, tw)), ("text_projection", (tw, ed)), ("logit_scale", ()),
        ("visual.class_embedding", (vw,)), ("visual.positional_embedding", (grid * grid + 1, vw)),
        ("visual.proj", (vw, ed)), ("visual.conv1.weight", (vw, 3, 16, 16)),
        ("visual.ln_pre.weight", (vw,)), ("visual.ln_pre.bias", (vw,)),
    ]  # fmt: skip
    for i in range(12):
        out += block(f"visual.transformer.resblocks.{i}", vw)
    out += [("visual.ln_post.weight", (vw,)), ("visual.ln_post.bias", (vw,))]
    for i in range(12):
        out += block(f"transformer.resblocks.{i}", tw)
    return [*out, ("token_embedding.weight", (rows, tw)), ("ln_final.weight", (tw,)), ("ln_final.bias", (tw,))]


def make_synthetic(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """Write the synthetic run (a store and ``epoch_N.pt`` files) under ``folder``; reuse it when complete."""
    import torch

    import ckptstore

    store_path, files = folder / "store", folder / "files"
    done = store_path.exists() and len(ckptstore.open_store(store_path).steps(RUN)) == args.count
    if done and len(list(files.glob("epoch_*.pt"))) == args.count:
        return store_path, files
    shutil.rmtree(folder, ignore_errors=True)
    files.mkdir(parents=True)
    store = ckptstore.create_store(store_path)
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    scale: dict[str, float] = {}  # the tensor's typical value: its init std, or 0.02 for norms, biases and scalars
    for name, shape in vit_b16_shapes(args.width_factor, args.vocab):
        if name == "logit_scale":
            sd[name], scale[name] = torch.tensor(math.log(1 / 0.07)), 0.02
        elif name.endswith(".weight") and len(shape) == 1:  # layer norm
            sd[name], scale[name] = torch.ones(shape), 0.02
        elif len(shape) == 1 and not name.endswith("class_embedding"):  # bias
            sd[name], scale[name] = torch.zeros(shape), 0.02
        else:
            std = 0.02 if "embedding" in name else math.prod(shape[1:] or shape) ** -0.5
            sd[name], scale[name] = torch.randn(shape, generator=gen) * std, std
    t0 = time.perf_counter()
    for epoch in range(1, args.count + 1):
        if epoch > 1:  # one epoch of "training": weight decay and a small random update
            for name, x in sd.items():
                x.mul_(1 - args.decay).add_(torch.randn(x.shape, generator=gen), alpha=args.noise * scale[name])
        loss = 1.0 + 4.0 * math.exp(-epoch / 6)
        store.save(
            RUN, 100 * epoch, {"state_dict": sd}, {"epoch": epoch, "loss": {"last": loss, "avg": loss, "window": 100}}
        )
        torch.save({"epoch": epoch, "state_dict": sd}, files / f"epoch_{epoch}.pt")
    print(f"generated {args.count} checkpoints in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return store_path, files


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(checkpoints: Path, work: Path) -> Path:
    """The store of the ``epoch_N.pt`` run (ingested once into ``work``)."""
    import ckptstore
    from ckptstore.integrations.openclip import ingest

    path = work / "store"
    store = ckptstore.open_store(path) if path.exists() else ckptstore.create_store(path)
    if not store.steps(RUN):
        ingest(store, [checkpoints], run=RUN)
    return path


def weight_sizes(path: Path) -> tuple[int, int]:
    """One checkpoint's weight bytes, and the size of its largest weight tensor."""
    import ckptstore
    from ckptstore.analysis.trajectory import StoreTrajectory

    traj = StoreTrajectory(ckptstore.open_store(path), RUN)
    sizes = [w.numel * ITEMSIZE[w.dtype] for w in traj.weights]
    return sum(sizes), max(sizes)


def measure(args: argparse.Namespace, store: Path, source: str, mode: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", source, "--mode", mode, "--store", str(store),
           "--checkpoints", str(args.checkpoints)] + (["--no-spectral"] if args.no_spectral else [])  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if res.returncode != 0:
        raise SystemExit(f"measurement {source}/{mode} failed:\n{res.stderr}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--checkpoints", type=Path, help="folder of epoch_N.pt files (default: the cached 20-epoch run)")
    p.add_argument("--work", type=Path, help="work folder for the store (default: a new temporary folder)")
    p.add_argument("--no-spectral", action="store_true", help="analyse without singular values")
    p.add_argument("--sources", default="store,files", help="comma-separated: store, files (default both)")
    p.add_argument("--no-mmap-threshold", action="store_true", help="skip the MALLOC_MMAP_THRESHOLD_ rows")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--synthetic", action="store_true", help="measure a generated ViT-B-16-shaped run instead")
    p.add_argument("--width-factor", type=float, default=0.5, help="--synthetic: scale of every width (default 0.5)")
    p.add_argument("--vocab", type=int, help="--synthetic: token table rows (default 49408 × the width factor)")
    p.add_argument("--count", type=int, default=20, help="--synthetic: number of checkpoints (default 20)")
    p.add_argument("--decay", type=float, default=2e-3, help="--synthetic: weight decay per epoch (default 0.002)")
    p.add_argument("--noise", type=float, default=0.02,
                   help="--synthetic: update per epoch, × each tensor's init std (default 0.02)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the generated run / the temporary work folder")
    p.add_argument("--child", choices=("store", "files"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("floor", "analysis"), default="analysis", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="ckpt-analysis-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if args.synthetic:
            store, args.checkpoints = make_synthetic(args, work / "synthetic")
        else:
            args.checkpoints = args.checkpoints or default_checkpoints()
            store = prepare(args.checkpoints, work)
        ckpt_bytes, biggest = weight_sizes(store)
        disk = {"store_mb": _du(store) / 2**20, "files_mb": _du(args.checkpoints) / 2**20}
        result = run_rows(args, store, ckpt_bytes, biggest)
    finally:
        if not args.keep:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
            elif args.synthetic:
                shutil.rmtree(work / "synthetic", ignore_errors=True)
    result.update(disk, total_wall_s=time.perf_counter() - t0)
    print_result(args, result, work)
    return 0


def run_rows(args: argparse.Namespace, store: Path, ckpt_bytes: int, biggest: int) -> dict[str, Any]:
    mb = ckpt_bytes / 2**20
    rows = []
    threshold = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    for source in args.sources.split(","):
        plans: list[tuple[str, dict[str, str]]] = [("floor", {}), ("analysis", {})]
        if source == "store" and not args.no_mmap_threshold:
            plans += [("floor", threshold), ("analysis", threshold)]
        for mode, env in plans:
            r = measure(args, store, source, mode, env)
            r.update(source=source, mode=mode + ("+mmap-threshold" if env else ""))
            r["x_checkpoint"] = r["peak_extra_mb"] / mb
            r["x_largest"] = r["peak_extra_mb"] / (biggest / 2**20)
            rows.append(r)
    return {
        "synthetic": {"width_factor": args.width_factor, "vocab": args.vocab} if args.synthetic else None,
        "checkpoints": rows[0]["checkpoints"] if rows else None,
        "checkpoint_weights_mb": mb,
        "largest_tensor_mb": biggest / 2**20,
        "largest_tensor_share": biggest / ckpt_bytes,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "rows": rows,
    }


def print_result(args: argparse.Namespace, result: dict[str, Any], work: Path) -> None:
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    what = f"synthetic ViT-B-16 × {args.width_factor:g}" if args.synthetic else str(args.checkpoints)
    kept = f"; kept in {work}" if args.keep or (args.work and not args.synthetic) else ""
    print(f"{what}: {result['checkpoints']} checkpoints; one checkpoint's weights: "
          f"{result['checkpoint_weights_mb']:.1f} MB, largest tensor {result['largest_tensor_mb']:.1f} MB "
          f"({100 * result['largest_tensor_share']:.1f} % of the weights); store {result['store_mb']:.0f} MB, "
          f".pt files {result['files_mb']:.0f} MB on disk; total {result['total_wall_s']:.0f} s{kept}")  # fmt: skip
    print(f"{'source':8} {'mode':26} {'wall s':>8} {'peak +MB':>9} {'x ckpt':>7} {'x big':>6} {'anon +MB':>9} "
          f"{'file +MB':>9}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['source']:8} {r['mode']:26} {r['wall_s']:8.1f} {r['peak_extra_mb']:9.1f} {r['x_checkpoint']:7.2f} "
              f"{r['x_largest']:6.2f} {r['peak_anon_extra_mb']:9.1f} {r['peak_file_extra_mb']:9.1f}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
