"""Hostile manifests (issue 14, item 3, manifests only): structural mutations of a store's manifests, re-checksummed,
then ``ckpt ls``-style listing, load and verify of every checkpoint (``ckptstore.testing.fuzz``). Runs under a
4 GiB address-space limit so that an allocation from a forged length shows as a finding, not a swapping machine.

    PYTHONPATH=src python benchmarks/fuzz_manifests.py [--cases 5000] [--seed 0] [--json OUT]

Exit status 1 when anything but the library's own errors came out.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from ckptstore.testing import bitrot, fuzz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    limit = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.ckpt"
        bitrot.build_store(path).close()
        t0 = time.perf_counter()
        res = fuzz.fuzz_manifests(path, args.cases, seed=args.seed)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
