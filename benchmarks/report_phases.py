"""Where ``ckpt report`` spends its time and memory, phase by phase, on the demo's run.

Runs what ``ckpt report RUN`` runs, in this order, timing each phase: the imports (torch, then open_clip, then
scikit-learn and matplotlib), the weight analysis (with and without singular values), the probe set, the
representations, transfer, stability, and the figures and page. Peak RSS (``ru_maxrss``) is printed after the imports
(what the libraries alone take) and at the end. Without ``--store``, the cached 2-epoch demo run
(``ensure_trajectory(epochs=2, size="tiny", n_images=256)``) is ingested into a temporary store first.

    python benchmarks/report_phases.py [--store PATH --run RUN] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    phases: list[tuple[str, float]] = []
    t0 = [time.perf_counter()]

    def mark(what: str) -> None:
        now = time.perf_counter()
        phases.append((what, now - t0[0]))
        t0[0] = now

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import torch  # noqa: F401

    mark("import torch")
    import open_clip  # noqa: F401

    mark("import open_clip (torchvision, transformers)")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.datasets
    import sklearn.linear_model  # noqa: F401

    mark("import scikit-learn, matplotlib")
    libs_mb = rss_mb()
    import ckptstore
    from ckptstore.analysis.probes import load_probe
    from ckptstore.analysis.report import report_json, write_report
    from ckptstore.analysis.report.run import clip_model_config
    from ckptstore.analysis.representations import analyze_representations
    from ckptstore.analysis.stability import analyze_stability
    from ckptstore.analysis.trajectory import StoreTrajectory
    from ckptstore.analysis.transfer import analyze_transfer
    from ckptstore.analysis.weights import analyze_weights

    work = tempfile.TemporaryDirectory()
    store_path = a.store
    if store_path is None:
        from ckptstore.demo.trajectory import ensure_trajectory
        from ckptstore.integrations import openclip

        store_path = str(Path(work.name) / "store")
        openclip.ingest(ckptstore.create_store(store_path), [ensure_trajectory(epochs=2, size="tiny", n_images=256)],
                        run=a.run)  # fmt: skip
        t0[0] = time.perf_counter()
    traj = StoreTrajectory(ckptstore.open_store(store_path), a.run)
    mark("open the run")
    weights = analyze_weights(traj, spectral=True)
    mark("weights, spectral (first read of the store)")
    analyze_weights(traj, spectral=False)
    mark("weights, no spectral (second read)")
    cfg = clip_model_config(traj, None)
    probe = load_probe("digits")
    mark("model config + digits probe set")
    rep = analyze_representations(traj, probe, model_config=cfg)
    mark("representations (forward passes, CKA)")
    tr = analyze_transfer(traj, probe, model_config=cfg)
    mark("transfer (features, linear probes)")
    st = analyze_stability(traj, weights=weights, representations=rep.to_dict())
    mark("stability")
    kw: dict[str, Any] = {"weights": weights.to_dict(), "representations": rep.to_dict(), "transfer": tr.to_dict(),
                          "stability": st.to_dict(), "skipped": {}}  # fmt: skip
    report_json(traj, **kw)
    write_report(traj, Path(work.name) / "report.html", **kw)
    mark("figures and page")
    out = {"phases": dict(phases), "libraries_peak_rss_mb": round(libs_mb), "peak_rss_mb": round(rss_mb()),
           "checkpoints": len(traj)}  # fmt: skip
    if a.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        for what, sec in phases:
            print(f"{what:48s} {sec:6.2f} s")
        print(f"peak RSS after the imports {libs_mb:.0f} MB; at the end {rss_mb():.0f} MB ({len(traj)} checkpoints)")
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
