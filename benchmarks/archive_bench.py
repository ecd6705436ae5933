"""The lossy archive tier (``lossy-q``, docs/archive.md) on a real open_clip_train trajectory: compression of
weights + AdamW state against the raw ``torch.save`` bytes, the observed errors against the bound, and the
reconstructed checkpoints' validation loss and zero-shot accuracy against the originals.

    PYTHONPATH=src python benchmarks/archive_bench.py [--epochs 10] [--json OUT] [--no-quality]

Closed loop: every tensor is quantised against the *reconstruction* of the same tensor in the previous
checkpoint, exactly as a reader will decode it; the first checkpoint against zero. Integers are packed by the
store's ``planes-zstd`` bytes codec and, for comparison, by plain zstd.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from ckptstore.codecs import TensorSpec, bytes_codec
from ckptstore.codecs.lossy import DEFAULT_BOUNDS, Bound, quantise, to_float
from ckptstore.demo import trajectory as tj
from ckptstore.format import tree
from ckptstore.integrations import openclip
from ckptstore.torch import load_pt


def kind_of(name: str) -> str | None:
    if name.startswith("state_dict/"):
        return "weights"
    if name.startswith("optimizer/state/") and name.endswith("/exp_avg"):
        return "exp_avg"
    if name.startswith("optimizer/state/") and name.endswith("/exp_avg_sq"):
        return "exp_avg_sq"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--weights", type=float, default=DEFAULT_BOUNDS["weights"].value, help="rel bound, weights")
    ap.add_argument("--exp-avg", type=float, default=DEFAULT_BOUNDS["exp_avg"].value, help="rel bound, exp_avg")
    ap.add_argument("--exp-avg-sq", type=float, default=DEFAULT_BOUNDS["exp_avg_sq"].value,
                    help="per-element relative bound, exp_avg_sq")  # fmt: skip
    ap.add_argument("--level", type=int, default=9, help="zstd level of the planes-zstd bytes codec (default 9)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--no-quality", action="store_true", help="skip validation loss / zero-shot")
    ap.add_argument("--entropy", action="store_true",
                    help="also measure pcodec and constriction's ANS (static order-0 model) on the integers; "
                    "needs both installed (not dependencies of ckptstore)")  # fmt: skip
    ap.add_argument("--store", metavar="POLICY", help="also ingest into a store and run archive(keep=POLICY) there")
    args = ap.parse_args()
    bounds = {"weights": Bound("rel", args.weights), "exp_avg": Bound("rel", args.exp_avg),
              "exp_avg_sq": Bound("elem", args.exp_avg_sq)}  # fmt: skip
    ckpts = tj.ensure_trajectory(epochs=20, size="tiny", n_images=128)
    files = openclip.epoch_files(ckpts)[: args.epochs]
    planes = bytes_codec("planes-zstd", args.level)
    zc = zstandard.ZstdCompressor(level=9)
    raw_file = sum(f.stat().st_size for f in files)
    sizes = {k: {"raw": 0, "planes": 0, "zstd": 0, **({"pcodec": 0, "ans": 0} if args.entropy else {})}
             for k in bounds}  # fmt: skip
    worst: dict[str, float] = dict.fromkeys(bounds, 0.0)
    violations = 0
    exceptions = 0
    other_raw = 0
    refs: dict[str, np.ndarray] = {}
    restored: dict[int, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for f in files:
        epoch = int(f.stem.split("_")[1])
        _, leaves = tree.flatten(load_pt(str(f)))
        restored[epoch] = {}
        for name, leaf in leaves.items():
            kind = kind_of(name)
            if kind is None or leaf.dtype not in ("float32", "float16", "bfloat16", "float64"):
                other_raw += leaf.nbytes
                continue
            values = leaf.to_numpy().reshape(-1) if leaf.dtype != "bfloat16" else leaf.words
            domain = "log" if kind == "exp_avg_sq" else "linear"
            codec, words, recon, rec = quantise(values, leaf.dtype, bounds[kind], domain=domain, ref=refs.get(name))
            refs[name] = recon
            x = to_float(values, leaf.dtype)
            fin = np.isfinite(x)
            err = np.abs(recon[fin] - x[fin])
            limit = bounds[kind].value * np.abs(x[fin]) if kind == "exp_avg_sq" else rec["eps"]
            violations += int(np.count_nonzero(err > limit))
            worst[kind] = max(worst[kind], float(rec["max_err"]) / (1.0 if kind == "exp_avg_sq" else
                                                                     (rec["eps"] or 1.0)))  # fmt: skip
            exceptions += rec["exceptions"]
            spec = TensorSpec(leaf.dtype, (words.size,))
            side = len(codec.side_bytes()) + len(json.dumps(codec.record()))
            sizes[kind]["raw"] += leaf.nbytes
            sizes[kind]["planes"] += len(planes.encode(words, spec)) + side
            sizes[kind]["zstd"] += len(zc.compress(words.tobytes())) + side
            if args.entropy:
                pc, ans = entropy_coded(words)
                sizes[kind]["pcodec"] += pc + side
                sizes[kind]["ans"] += ans + side
            if kind == "weights":
                restored[epoch][name[len("state_dict/") :]] = recon.astype(np.float32).reshape(leaf.shape)
    t_enc = time.perf_counter() - t0
    raw = sum(v["raw"] for v in sizes.values())
    best = sum(min(v["planes"], v["zstd"]) for v in sizes.values())
    out: dict[str, Any] = {
        "epochs": len(files),
        "bounds": {k: b.as_dict() for k, b in bounds.items()},
        "raw_pt_bytes": raw_file,
        "weights_adamw_raw_bytes": raw,
        "other_tensor_bytes": other_raw,
        "lossy_bytes_planes": sum(v["planes"] for v in sizes.values()),
        "lossy_bytes_zstd": sum(v["zstd"] for v in sizes.values()),
        **(
            {
                "lossy_bytes_pcodec": sum(v["pcodec"] for v in sizes.values()),
                "lossy_bytes_ans": sum(v["ans"] for v in sizes.values()),
            }
            if args.entropy
            else {}
        ),
        "ratio_vs_raw_tensors": round(raw / best, 2),
        "ratio_vs_pt_files": round(raw_file / best, 2),
        "per_kind": {k: {**v, "ratio": round(v["raw"] / min(v["planes"], v["zstd"]), 2)} for k, v in sizes.items()},
        "worst_error_over_bound": worst,
        "bound_violations": violations,
        "exceptions": exceptions,
        "encode_s": round(t_enc, 1),
    }
    if args.store:
        out["store"] = in_store(files, args.store, bounds)
    if not args.no_quality:
        out["quality"] = quality(ckpts, files, restored)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if violations == 0 else 1


def entropy_coded(words: np.ndarray) -> tuple[int, int]:
    """Bytes of the zig-zag words as signed integers through pcodec, and through constriction's ANS coder with
    a static order-0 model of the tensor's own symbol frequencies (the model costs 12 bytes a symbol)."""
    import constriction
    from pcodec import ChunkConfig, standalone

    if words.size == 0:
        return 0, 0
    u = words.astype(np.int64)
    codes = (u >> 1) ^ -(u & 1)
    narrow = codes.astype(np.int32) if words.itemsize <= 4 else codes
    pc = len(standalone.simple_compress(narrow, ChunkConfig()))
    values, symbols = np.unique(codes, return_inverse=True)
    if values.size == 1:
        return pc, 12 + 8  # one symbol: the model and the length say everything
    counts = np.bincount(symbols).astype(np.float64)
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), model)
    return pc, coder.get_compressed().nbytes + 12 * values.size


def in_store(files: list[Path], keep: str, bounds: dict[str, Bound]) -> dict[str, Any]:
    """``ckptstore.archive.archive`` in a real store: pack bytes before and after, verify."""
    import tempfile

    from ckptstore import archive
    from ckptstore.store import create_store

    with tempfile.TemporaryDirectory() as d:
        store = create_store(Path(d) / "s.ckpt")
        openclip.ingest(store, [str(f) for f in files], run="r")
        t0 = time.perf_counter()
        res = archive.archive(store, "r", keep, bounds=bounds)
        took = time.perf_counter() - t0
        ver = store.verify("r")
    return {"keep": keep, "lossless_store_bytes": res["store_bytes_before"], "archived_store_bytes":
            res["store_bytes_after"], "converted": res["converted"], "kept": res["kept"], "verify_ok": ver["ok"],
            "archive_s": round(took, 1)}  # fmt: skip


def quality(ckpts: Path, files: list[Path], restored: dict[int, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Zero-shot loss and top-1 accuracy (open_clip's own zero-shot classifier, the analysis package's
    ``OpenClipEvaluator``) of each original and each restored checkpoint, on 400 digits drawn with another seed
    than the demo's (the run trained on 128 of the 1797)."""
    import torch

    from ckptstore.analysis.interpolation import OpenClipEvaluator
    from ckptstore.analysis.probes import digits_probe
    from ckptstore.analysis.trajectory import FileTrajectory

    evaluate = OpenClipEvaluator(FileTrajectory([files[0]]), digits_probe(400, seed=7))
    rows = []
    for f in files:
        epoch = int(f.stem.split("_")[1])
        orig = {k.removeprefix("module."): v for k, v in load_pt(str(f))["state_dict"].items()}
        lossy = dict(orig)
        for k, v in restored[epoch].items():
            lossy[k.removeprefix("module.")] = torch.from_numpy(v).to(orig[k.removeprefix("module.")].dtype)
        a, b = evaluate(orig), evaluate(lossy)
        rows.append({"epoch": epoch, "original": a, "lossy": b,
                     "d_top1_pp": round(100 * (b["top1"] - a["top1"]), 3) if "top1" in a else None,
                     "d_loss_rel": (b["loss"] - a["loss"]) / a["loss"]})  # fmt: skip
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
