"""Thread counts from the free cores (docs/design-notes.md §5: on 2 shared cores, 2 torch threads next to a busy process
ran ~25x slower than 1). ``PAR_THREADS`` overrides the estimate."""

from __future__ import annotations

import os


def free_cores() -> int:
    env = os.environ.get("PAR_THREADS")
    if env:
        return max(1, int(env))
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))
