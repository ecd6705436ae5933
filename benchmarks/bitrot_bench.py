"""Bit-rot sweep (issue 14, item 5): flip single random bits in a store's packs and manifests, one per trial, and
check that ``verify`` finds each one and names the checkpoints and tensors affected, and that no load returns
wrong bytes (``ckptstore.testing.bitrot``).

    PYTHONPATH=src python benchmarks/bitrot_bench.py [--trials 2000] [--seed 0] [--legacy-manifests] [--json OUT]

``--legacy-manifests`` rewrites the manifests as they were before format §4.1 (no checksum) first: the figures
then show what the checksum buys. Exit status 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ckptstore.format.manifest import parse_manifest
from ckptstore.testing import bitrot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--legacy-manifests", action="store_true", help="strip the manifest checksums first")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rot.ckpt"
        bitrot.build_store(path, checkpoints=args.checkpoints, seed=args.seed).close()
        if args.legacy_manifests:
            for f in (path / "runs").rglob("*.json"):
                data = parse_manifest(f.read_bytes(), str(f))
                f.write_bytes(json.dumps(data, separators=(",", ":")).encode())
        t0 = time.perf_counter()

        def show(i: int, t: bitrot.Trial) -> None:
            if not t.ok:
                print(f"trial {i}: {t.file} byte {t.offset} bit {t.bit} ({t.where}): {t.failures[0]}", file=sys.stderr)

        res = bitrot.sweep(path, args.trials, seed=args.seed, on_trial=show)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res["legacy_manifests"] = args.legacy_manifests
        res["store_files"] = {
            "manifests": len(list((path / "runs").rglob("*.json"))),
            "packs": len(list((path / "packs").rglob("*.pack"))),
            "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        }
    failed = res.pop("failed_trials")
    kinds: dict[str, int] = {}
    for t in failed:
        key = f"{t['where']}: {t['failures'][0].split(':')[0]}"
        kinds[key] = kinds.get(key, 0) + 1
    res["failure_kinds"] = kinds
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "failed_trials": failed}, indent=2) + "\n")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
