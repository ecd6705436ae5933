"""``ckpt report`` as a user runs it: the whole program, wall time, CPU time and peak RSS, and whether the JSON is
the same for every source tree compared (issue 17 item 3).

Each run is a fresh ``python -m ckptstore.cli report RUN --json -O page.html`` (imports, analyses, page, the
process's exit); with several ``--src`` trees (each a ``src`` folder: PYTHONPATH) the runs are interleaved, so a
load that comes and goes on a shared machine falls on all trees alike. CPU time (user + system, of the process and
its children) moves less with load than wall time. The JSON is compared without the fields that differ between two
runs of one tree: ``generated`` and the per-checkpoint ``seconds``. Without ``--store``, the cached 2-epoch demo
run is ingested into a temporary store first.

    python benchmarks/report_cli.py [--store PATH --run RUN] [--repeat 3] [--src NAME=PATH ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _stable(blob: dict[str, Any]) -> str:
    out = {k: v for k, v in blob.items() if k != "generated"}
    for key in ("representations", "transfer"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "seconds"}
    return json.dumps(out, sort_keys=True)


def _one(src: str, store: str, run: str, page: Path, env: dict[str, str]) -> dict[str, Any]:
    """One ``ckpt report`` process: wall time, its own CPU time and peak RSS (``wait4``), the JSON (stable part)."""
    page.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ckptstore.cli", "report", run, "-s", store, "--json", "-O", str(page)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**env, "PYTHONPATH": src})
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"ckpt report failed under {src}:\n{err.read().decode()[-3000:]}")
        blob = json.loads(out.read())
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "json": _stable(blob)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--src", action="append", default=[], metavar="NAME=PATH", help="a src folder to run (repeatable)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    trees = [tuple(s.split("=", 1)) for s in a.src] or [("this", str(Path(__file__).resolve().parents[1] / "src"))]
    work = tempfile.TemporaryDirectory()
    store = a.store
    if store is None:
        import ckptstore
        from ckptstore.demo.trajectory import ensure_trajectory
        from ckptstore.integrations import openclip

        store = str(Path(work.name) / "store")
        openclip.ingest(ckptstore.create_store(store), [ensure_trajectory(epochs=2, size="tiny", n_images=256)],
                        run=a.run)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    reference: str | None = None
    for i in range(a.repeat):
        for name, src in trees:
            got = _one(src, store, a.run, Path(work.name) / f"{name}.html", env)
            reference = reference or got["json"]
            row = {**{k: v for k, v in got.items() if k != "json"}, "same_json": got["json"] == reference,
                   "load": round(os.getloadavg()[0], 1)}  # fmt: skip
            rows[name].append(row)
            if not a.json:
                print(f"run {i + 1} {name:8s} " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    summary = {
        name: {
            "median_wall_s": statistics.median(r["wall_s"] for r in rs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "same_json": all(r["same_json"] for r in rs),
            "runs": rs,
        }
        for name, rs in rows.items()
    }
    if a.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        for name, s in summary.items():
            print(
                f"{name:8s} median wall {s['median_wall_s']:.2f} s, median CPU {s['median_cpu_s']:.2f} s, "
                f"peak RSS {s['max_peak_rss_mb']} MB, JSON the same as the first tree's: {s['same_json']}"
            )
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
