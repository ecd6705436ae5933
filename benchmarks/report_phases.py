"""Where ``ckpt report`` spends its time and memory, phase by phase, on the demo's run.

Runs what ``ckpt report RUN`` runs, in this order, timing each phase (wall and CPU seconds): the imports (torch,
scikit-learn and matplotlib), the weight analysis (with and without singular values), the model's config and the
open_clip import (as ``ckpt report`` does it: without transformers and timm when the model uses neither; in full with
``--full-open-clip``), the probe set, the representations, transfer, stability, and the figures and page. Peak RSS
(``ru_maxrss``) is printed after the imports (what the libraries alone take) and at the end. Without ``--store``, the
cached 2-epoch demo run (``ensure_trajectory(epochs=2, size="tiny", n_images=256)``) is ingested into a temporary
store first. The whole program, exit included: ``benchmarks/report_cli.py``.

    python benchmarks/report_phases.py [--store PATH --run RUN] [--full-open-clip] [--json]
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
    ap.add_argument("--full-open-clip", action="store_true", help="import open_clip in full (before issue 17)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    phases: list[tuple[str, float, float]] = []
    t0 = [time.perf_counter(), time.process_time()]

    def mark(what: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        phases.append((what, now[0] - t0[0], now[1] - t0[1]))
        t0[:] = now

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import torch  # noqa: F401

    mark("import torch")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.datasets
    import sklearn.linear_model  # noqa: F401

    mark("import scikit-learn, matplotlib")
    libs_mb = rss_mb()
    import ckptstore
    from ckptstore.analysis.probes import load_probe
    from ckptstore.analysis.report import report_json, write_report
    from ckptstore.analysis.report.run import clip_model_config
    from ckptstore.analysis.representations import analyze_representations, import_open_clip_for
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
        t0[:] = [time.perf_counter(), time.process_time()]
    traj = StoreTrajectory(ckptstore.open_store(store_path), a.run)
    mark("open the run")
    weights = analyze_weights(traj, spectral=True)
    mark("weights, spectral (first read of the store)")
    analyze_weights(traj, spectral=False)
    mark("weights, no spectral (second read)")
    cfg = clip_model_config(traj, None)
    if a.full_open_clip:
        import open_clip  # noqa: F401
    hidden = import_open_clip_for(cfg)
    mark("model config, import open_clip" + (f" (without {', '.join(hidden)})" if hidden else " (in full)"))
    probe = load_probe("digits")
    mark("digits probe set")
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
    out = {
        "phases": {what: {"wall_s": round(w, 3), "cpu_s": round(c, 3)} for what, w, c in phases},
        "libraries_peak_rss_mb": round(libs_mb),
        "peak_rss_mb": round(rss_mb()),
        "checkpoints": len(traj),
    }
    if a.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        for what, wall, cpu in phases:
            print(f"{what:60s} {wall:6.2f} s wall {cpu:6.2f} s CPU")
        print(f"peak RSS after torch, sklearn, matplotlib {libs_mb:.0f} MB; at the end {rss_mb():.0f} MB "
              f"({len(traj)} checkpoints)")  # fmt: skip
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
