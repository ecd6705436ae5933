"""Fork ``world`` rank processes of a torch.distributed job from one warm process (tests and benchmarks).

Forking after ``import torch`` starts each rank in milliseconds instead of seconds; each child runs
``target(rank)`` and ends with ``os._exit`` (0, or 1 with its traceback on stderr). When a rank fails, its peers
are killed at once: they would otherwise wait for it until gloo's timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable


def fork_ranks(world: int, target: Callable[[int], None]) -> tuple[int, int] | None:
    """Run ``target(rank)`` in ``world`` forked children; returns the first failed (rank, exit code), or None."""
    pids = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                target(rank)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids[pid] = rank
    failed = None
    while pids:
        pid, raw = os.wait()
        rank = pids.pop(pid)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and failed is None:
            failed = (rank, code)
            for other in pids:
                os.kill(other, signal.SIGKILL)
    return failed
